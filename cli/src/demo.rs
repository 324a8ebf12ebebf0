//! `wharf demo`: the whole story in one command, without Docker.
//!
//! Synthesizes two versions of a small ML-style image in `docker save`
//! format (a base layer; a Python-packages layer rebuilt with new mtimes and
//! one bumped package; an app layer), adds both to a scratch store, shows
//! what v2 cost, rebuilds v2 and proves it byte-identical.

use anyhow::{bail, Context, Result};
use indicatif::HumanBytes;
use sha2::Digest;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;
use wharf_format::ingest::{self, AddOptions, AddReport};
use wharf_format::store::{Store, StoreConfig};
use wharf_format::synth::{self, Layout, Scale, Version};
use wharf_transport::bundle;
use wharf_transport::send::DeltaOptions;

const SEED: u64 = 2026;

fn synth_to(path: &Path, layout: Layout, version: Version) -> Result<u64> {
    let f = std::fs::File::create(path).with_context(|| format!("create {}", path.display()))?;
    let mut w = std::io::BufWriter::new(f);
    synth::write_image(&mut w, layout, version, Scale::demo(), SEED)
        .with_context(|| format!("write {}", path.display()))?;
    std::io::Write::flush(&mut w)?;
    Ok(std::fs::metadata(path)?.len())
}

fn add(store: &Arc<Store>, path: &Path, name: &str) -> Result<AddReport> {
    let mut f = std::fs::File::open(path)?;
    Ok(ingest::add(store, &mut f, name, &AddOptions::default())?)
}

fn sha256_file(path: &Path) -> Result<String> {
    let mut f = std::fs::File::open(path)?;
    let mut h = sha2::Sha256::new();
    std::io::copy(&mut f, &mut h)?;
    Ok(hex::encode(h.finalize()))
}

pub fn run(keep: Option<PathBuf>, json: bool) -> Result<()> {
    let started = Instant::now();
    let tmp;
    let dir = match keep {
        Some(d) => {
            std::fs::create_dir_all(&d)?;
            d
        }
        None => {
            tmp = tempfile::tempdir()?;
            tmp.path().to_path_buf()
        }
    };
    let say = |s: String| {
        if !json {
            out!("{s}");
        }
    };
    let v1 = dir.join("wharf-demo_v1.tar");
    let v2 = dir.join("wharf-demo_v2.tar");
    let v2_oci = dir.join("wharf-demo_v2-oci.tar");
    let v1_len = synth_to(&v1, Layout::Legacy, Version::V1)?;
    let v2_len = synth_to(&v2, Layout::Legacy, Version::V2)?;
    let v2_oci_len = synth_to(&v2_oci, Layout::Oci, Version::V2)?;
    say(format!(
        "synthesized two versions of a Python ML image in `docker save` format in {}:\n  \
         v1 {} and v2 {} (v2 rebuilt the pip layer: new mtimes everywhere, one package bumped; the app changed)",
        dir.display(),
        HumanBytes(v1_len),
        HumanBytes(v2_len)
    ));
    let store_dir = dir.join("store");
    if store_dir.exists() {
        std::fs::remove_dir_all(&store_dir)?;
    }
    let store = Arc::new(Store::init(&store_dir, StoreConfig::default())?);
    let r1 = add(&store, &v1, "wharf-demo:v1")?;
    say(format!(
        "wharf add v1: {} in, {} stored on disk (compressed)",
        HumanBytes(r1.len),
        HumanBytes(r1.stored_bytes)
    ));
    let r2 = add(&store, &v2, "wharf-demo:v2")?;
    say(format!(
        "wharf add v2: {} in, {} new ({:.2}% of v2), {} on disk (what whole new chunks would cost a receiver holding v1)",
        HumanBytes(r2.len),
        HumanBytes(r2.new_bytes),
        100.0 * r2.new_bytes as f64 / r2.len as f64,
        HumanBytes(r2.stored_bytes)
    ));
    let r3 = add(&store, &v2_oci, "wharf-demo:v2-oci")?;
    say(format!(
        "wharf add v2 in the OCI layout of Docker >= 25: {} in, {} new (its layers were recognised by digest)",
        HumanBytes(r3.len),
        HumanBytes(r3.new_bytes)
    ));
    let rebuilt = dir.join("wharf-demo_v2.rebuilt.tar");
    wharf_format::extract::extract_to_file(&store, "wharf-demo:v2", &rebuilt, None)?;
    let (a, b) = (sha256_file(&v2)?, sha256_file(&rebuilt)?);
    let identical = a == b && std::fs::read(&v2)? == std::fs::read(&rebuilt)?;
    say(format!(
        "wharf extract v2: rebuilt {} — sha256 {} — {}",
        rebuilt.display(),
        &b[..16],
        if identical {
            "byte-identical to the original"
        } else {
            "DIFFERENT"
        }
    ));
    // The transfer: a receiver that holds v1 gets v2 as a bundle, with
    // chunks as deltas against what it holds, and rebuilds it exactly.
    let recv = Arc::new(Store::init(&dir.join("receiver"), StoreConfig::default())?);
    add(&recv, &v1, "wharf-demo:v1")?;
    let have = ["wharf-demo:v1".to_string()];
    let none = std::collections::HashSet::new();
    let mut plain = Vec::new();
    let off = DeltaOptions {
        enabled: false,
        ..Default::default()
    };
    bundle::write_bundle(&store, "wharf-demo:v2", &have, &none, off, &mut plain)?;
    let mut with_deltas = Vec::new();
    let sent = bundle::write_bundle(
        &store,
        "wharf-demo:v2",
        &have,
        &none,
        DeltaOptions::default(),
        &mut with_deltas,
    )?;
    bundle::read_bundle(&recv, &mut &with_deltas[..])?;
    let received = wharf_format::extract::extract_to_vec(&recv, "wharf-demo:v2")?;
    let transferred = received == std::fs::read(&v2)?;
    say(format!(
        "wharf bundle v2 --have v1: {} for a receiver holding v1 ({} of {} chunks as deltas; {} without deltas); \
         applied there and rebuilt {}",
        HumanBytes(with_deltas.len() as u64),
        sent.delta_chunks,
        sent.chunks_sent,
        HumanBytes(plain.len() as u64),
        if transferred {
            "byte-identical"
        } else {
            "DIFFERENT"
        }
    ));
    let verify = wharf_format::maintenance::verify(&store, true)?;
    say(format!(
        "wharf verify --full: {} chunks re-hashed, {}",
        verify.chunks_checked,
        if verify.errors.is_empty() {
            "ok"
        } else {
            "FAILED"
        }
    ));
    if json {
        out!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "dir": dir,
                "v1_bytes": v1_len,
                "v2_bytes": v2_len,
                "v2_oci_bytes": v2_oci_len,
                "v1_stored_bytes": r1.stored_bytes,
                "v2_new_bytes": r2.new_bytes,
                "v2_stored_bytes": r2.stored_bytes,
                "v2_oci_new_bytes": r3.new_bytes,
                "bundle_bytes": with_deltas.len(),
                "bundle_bytes_without_deltas": plain.len(),
                "bundle_delta_chunks": sent.delta_chunks,
                "transfer_byte_identical": transferred,
                "byte_identical": identical,
                "verify_errors": verify.errors,
                "seconds": started.elapsed().as_secs_f64(),
            }))?
        );
    } else {
        say(format!("done in {:.1} s", started.elapsed().as_secs_f64()));
    }
    if !identical || !transferred || !verify.errors.is_empty() {
        bail!("the demo's rebuild was not byte-identical or the store did not verify");
    }
    Ok(())
}
