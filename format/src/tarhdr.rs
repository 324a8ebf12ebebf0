//! Just enough tar header parsing to walk an archive without trusting it.
//!
//! Every function here takes untrusted bytes and returns `None` for anything
//! it does not understand; the caller then stores the rest as plain bytes.

pub const BLOCK: usize = 512;

/// What follows a header in the archive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryKind {
    /// Content bytes that are file data (regular files, GNU sparse data, dumpdirs).
    Content,
    /// Content bytes that describe the next entry (PAX, GNU long name/link).
    Meta,
    /// No content, whatever the size field says (links, devices, dirs, fifos),
    /// as Go's archive/tar and GNU tar read them.
    HeaderOnly,
}

pub struct Header {
    pub kind: EntryKind,
    pub typeflag: u8,
    pub size: u64,
    /// GNU old-style sparse: extension header blocks follow the header.
    pub gnu_sparse_extended: bool,
    pub path: Vec<u8>,
}

fn parse_octal(field: &[u8]) -> Option<u64> {
    let mut v: u64 = 0;
    let mut seen = false;
    let mut ended = false;
    for &b in field {
        match b {
            b'0'..=b'7' if !ended => {
                v = v.checked_mul(8)?.checked_add((b - b'0') as u64)?;
                seen = true;
            }
            b' ' if !seen => {}
            b' ' | 0 => ended = true,
            _ => return None,
        }
    }
    if seen || field.iter().all(|&b| b == 0 || b == b' ') {
        Some(v)
    } else {
        None
    }
}

/// A numeric field: octal, or GNU base-256 when the high bit is set.
pub fn parse_numeric(field: &[u8]) -> Option<u64> {
    match field.first() {
        Some(&b) if b & 0x80 != 0 => {
            if b & 0x40 != 0 {
                return None; // negative
            }
            let mut v: u64 = (b & 0x3f) as u64;
            for &x in &field[1..] {
                v = v.checked_mul(256)?.checked_add(x as u64)?;
            }
            Some(v)
        }
        _ => parse_octal(field),
    }
}

pub fn checksum_ok(block: &[u8]) -> bool {
    if block.len() != BLOCK {
        return false;
    }
    let Some(want) = parse_octal(&block[148..156]) else {
        return false;
    };
    let (unsigned, signed) = checksum_sums(block);
    want == unsigned || want as i64 == signed
}

/// The header checksum of `block`, as unsigned and as signed bytes: the sum
/// of its bytes with the checksum field (148..156) counted as spaces.
pub fn checksum_sums(block: &[u8]) -> (u64, i64) {
    let mut unsigned: u64 = 0;
    let mut signed: i64 = 0;
    for (i, &b) in block.iter().enumerate() {
        let b = if (148..156).contains(&i) { b' ' } else { b };
        unsigned += b as u64;
        signed += (b as i8) as i64;
    }
    (unsigned, signed)
}

pub fn is_zero_block(block: &[u8]) -> bool {
    block.iter().all(|&b| b == 0)
}

fn has_ustar_magic(block: &[u8]) -> bool {
    &block[257..263] == b"ustar\0" || &block[257..265] == b"ustar  \0"
}

/// A block that starts a tar archive we are willing to split: a valid
/// checksum and the ustar (POSIX or GNU) magic. Old v7 archives are stored as
/// plain bytes, which is exact, only less clever.
pub fn looks_like_tar(block: &[u8]) -> bool {
    block.len() == BLOCK && !is_zero_block(block) && checksum_ok(block) && has_ustar_magic(block)
}

fn cstr(b: &[u8]) -> &[u8] {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    &b[..end]
}

/// Parses a header block; `None` when it is not one we can walk past safely.
pub fn parse_header(block: &[u8]) -> Option<Header> {
    if block.len() != BLOCK || !checksum_ok(block) {
        return None;
    }
    let typeflag = block[156];
    let size = parse_numeric(&block[124..136])?;
    let kind = match typeflag {
        b'0' | 0 | b'7' | b'S' | b'D' => EntryKind::Content,
        b'x' | b'g' | b'X' | b'L' | b'K' => EntryKind::Meta,
        b'1' | b'2' | b'3' | b'4' | b'5' | b'6' => EntryKind::HeaderOnly,
        _ => return None,
    };
    let mut path = Vec::new();
    if has_ustar_magic(block) && &block[257..263] == b"ustar\0" {
        let prefix = cstr(&block[345..500]);
        if !prefix.is_empty() {
            path.extend_from_slice(prefix);
            path.push(b'/');
        }
    }
    path.extend_from_slice(cstr(&block[..100]));
    Some(Header {
        kind,
        typeflag,
        size,
        gnu_sparse_extended: typeflag == b'S' && block[482] != 0,
        path,
    })
}

/// Values from a PAX extended header that change how the next entry is read.
#[derive(Default, Debug)]
pub struct PaxOverrides {
    pub size: Option<u64>,
    pub path: Option<Vec<u8>>,
}

/// Parses PAX records (`"%d %s=%s\n"`); malformed records end the parse.
pub fn parse_pax(mut b: &[u8]) -> PaxOverrides {
    let mut out = PaxOverrides::default();
    while !b.is_empty() {
        let Some(sp) = b.iter().position(|&c| c == b' ') else {
            break;
        };
        let Some(len) = std::str::from_utf8(&b[..sp])
            .ok()
            .and_then(|s| s.parse::<usize>().ok())
        else {
            break;
        };
        if len <= sp + 1 || len > b.len() {
            break;
        }
        let rec = &b[sp + 1..len];
        let rec = rec.strip_suffix(b"\n").unwrap_or(rec);
        if let Some(eq) = rec.iter().position(|&c| c == b'=') {
            let (k, v) = (&rec[..eq], &rec[eq + 1..]);
            match k {
                b"size" => {
                    out.size = std::str::from_utf8(v).ok().and_then(|s| s.parse().ok());
                }
                b"path" => out.path = Some(v.to_vec()),
                _ => {}
            }
        }
        b = &b[len..];
    }
    out
}

pub fn padding(size: u64) -> u64 {
    (BLOCK as u64 - size % BLOCK as u64) % BLOCK as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numeric_fields() {
        assert_eq!(parse_numeric(b"00000001750\0"), Some(1000));
        assert_eq!(parse_numeric(b"     1750 \0"), Some(1000));
        assert_eq!(
            parse_numeric(&[0x80, 0, 0, 0, 0, 0, 0, 0, 0, 2, 0, 0]),
            Some(2 << 16)
        );
        assert_eq!(parse_numeric(&[0xff; 12]), None);
        assert_eq!(parse_numeric(b"12x4"), None);
    }

    #[test]
    fn pax_records() {
        let p = parse_pax(b"20 size=12345678901\n18 path=some/file\n");
        assert_eq!(p.size, Some(12345678901));
        assert_eq!(p.path.as_deref(), Some(&b"some/file"[..]));
        let broken = parse_pax(b"999 size=1\n");
        assert_eq!(broken.size, None);
    }
}
