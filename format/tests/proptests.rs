//! Property tests: whatever the input, it comes back exactly.

mod common;
use common::*;
use proptest::prelude::*;
use wharf_format::synth::TarWriter;

#[derive(Debug, Clone)]
enum Member {
    File(String, Vec<u8>),
    Dir(String),
    Symlink(String, String),
    Hardlink(String, String),
    LongGnu(String, Vec<u8>),
    Pax(String, Vec<u8>),
    Whiteout(String),
}

fn name() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-z]{1,12}(/[a-z0-9._-]{1,20}){0,3}",
        "[a-zé✓]{1,8}",
        "[a-z]{90,130}",
        "[a-z]{40}/[a-z]{40}/[a-z]{40}/[a-z]{40}",
    ]
}

fn member() -> impl Strategy<Value = Member> {
    let data = prop::collection::vec(any::<u8>(), 0..3000);
    prop_oneof![
        (name(), data.clone()).prop_map(|(n, d)| Member::File(n, d)),
        name().prop_map(|n| Member::Dir(n + "/")),
        (name(), name()).prop_map(|(a, b)| Member::Symlink(a, b)),
        (name(), name()).prop_map(|(a, b)| Member::Hardlink(a, b)),
        ("[a-z]{101,200}", data.clone()).prop_map(|(n, d)| Member::LongGnu(n, d)),
        (name(), data).prop_map(|(n, d)| Member::Pax(n, d)),
        name().prop_map(|n| Member::Whiteout(format!("{n}/.wh.gone"))),
    ]
}

fn build(members: &[Member], tail: &[u8], finish: bool) -> Vec<u8> {
    let mut w = TarWriter::new(Vec::new());
    let t = 1_600_000_000;
    for m in members {
        match m {
            Member::File(n, d) => w.file(n, 0o644, t, d),
            Member::Dir(n) => w.dir(n, 0o755, t),
            Member::Symlink(a, b) => w.symlink(a, b, t),
            Member::Hardlink(a, b) => w.hardlink(a, b, t),
            Member::LongGnu(n, d) => w.gnu_longname_file(n, 0o644, t, d),
            Member::Pax(n, d) => w.pax_file(n, &[("comment", "x")], 0o600, t, d),
            Member::Whiteout(n) => w.whiteout(n, t),
        }
        .unwrap();
    }
    if finish {
        w.finish().unwrap();
    }
    w.raw(tail).unwrap();
    w.into_inner()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn generated_tars_round_trip(
        members in prop::collection::vec(member(), 0..20),
        tail in prop::collection::vec(any::<u8>(), 0..700),
        finish in any::<bool>(),
        cut in any::<prop::sample::Index>(),
        do_cut in any::<bool>(),
    ) {
        let (_d, store) = new_store();
        let mut bytes = build(&members, &tail, finish);
        if do_cut && !bytes.is_empty() {
            bytes.truncate(cut.index(bytes.len()));
        }
        assert_round_trip(&store, "p", &bytes);
        // The same tar nested as a layer inside an outer tar.
        let outer = build(&[Member::File("layer.tar".into(), bytes.clone())], &[], true);
        assert_round_trip(&store, "outer", &outer);
    }

    #[test]
    fn byte_strings_round_trip(bytes in prop::collection::vec(any::<u8>(), 0..20_000)) {
        let (_d, store) = new_store();
        assert_round_trip(&store, "b", &bytes);
    }

    #[test]
    fn flipped_bytes_in_a_tar_round_trip(
        members in prop::collection::vec(member(), 1..8),
        flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
    ) {
        let (_d, store) = new_store();
        let mut bytes = build(&members, &[], true);
        for (i, v) in flips {
            let at = i.index(bytes.len());
            bytes[at] = v;
        }
        assert_round_trip(&store, "f", &bytes);
    }
}
