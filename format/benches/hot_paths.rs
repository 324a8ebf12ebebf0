//! Micro-benchmarks of the hot paths, for `cargo bench -p wharf-format`:
//! FastCDC cutting, BLAKE3 of a chunk, SHA-256, zstd at the store's level
//! (compress and decompress), the tar walk of ingest, and index look-ups in
//! an index of 10 million chunks. The end-to-end figures and the peers are
//! in benches/RESULTS.md (`python3 benches/run.py`).

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use sha2::Digest;
use std::hint::black_box;
use std::sync::Arc;
use wharf_format::chunker::{ChunkParams, Chunker};
use wharf_format::hash::ChunkId;
use wharf_format::pack::{self, IndexEntry, IndexFile, PackId};
use wharf_format::store::{Store, StoreConfig};
use wharf_format::synth::{self, Layout, Scale, Version};

/// Compressible, structured bytes (like binaries and text), deterministic.
fn data(len: usize) -> Vec<u8> {
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    let mut v = Vec::with_capacity(len);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        if x.is_multiple_of(3) {
            v.extend_from_slice(b"import numpy as np\nimport pandas as pd\n");
        } else {
            v.extend_from_slice(&x.to_le_bytes()[..5]);
        }
    }
    v.truncate(len);
    v
}

fn chunking(c: &mut Criterion) {
    let buf = data(64 << 20);
    let mut g = c.benchmark_group("fastcdc");
    g.throughput(Throughput::Bytes(buf.len() as u64));
    g.sample_size(10);
    g.bench_function("cut 64 MiB at 16 KiB avg", |b| {
        b.iter(|| {
            let mut ch = Chunker::new(ChunkParams::DEFAULT);
            let mut n = 0usize;
            let mut emit = |c: &[u8]| -> Result<(), ()> {
                n += c.len();
                Ok(())
            };
            let _ = ch.push(&buf, &mut emit);
            let _ = ch.finish(&mut emit);
            black_box(n)
        })
    });
    g.finish();
}

fn hashing(c: &mut Criterion) {
    let chunk = data(16 << 10);
    let big = data(16 << 20);
    let mut g = c.benchmark_group("hash");
    g.throughput(Throughput::Bytes(chunk.len() as u64));
    g.bench_function("blake3 of a 16 KiB chunk", |b| {
        b.iter(|| black_box(ChunkId::of(&chunk)))
    });
    g.throughput(Throughput::Bytes(big.len() as u64));
    g.bench_function("sha256 of 16 MiB", |b| {
        b.iter(|| black_box(sha2::Sha256::digest(&big)))
    });
    g.finish();
}

fn zstd_level(c: &mut Criterion) {
    let chunk = data(16 << 10);
    let level = StoreConfig::default().zstd_level;
    let z = zstd::bulk::compress(&chunk, level).unwrap_or_default();
    let mut g = c.benchmark_group("zstd");
    g.throughput(Throughput::Bytes(chunk.len() as u64));
    let mut comp = zstd::bulk::Compressor::new(level).ok();
    g.bench_with_input(
        BenchmarkId::new("compress 16 KiB chunk, level", level),
        &chunk,
        |b, chunk| b.iter(|| comp.as_mut().map(|c| c.compress(chunk).map(|v| v.len()))),
    );
    g.bench_function("decompress 16 KiB chunk", |b| {
        b.iter(|| wharf_format::store::decompress(&z, chunk.len()).map(|v| v.len()))
    });
    g.finish();
}

fn tar_walk(c: &mut Criterion) {
    // Re-adding a stored image: the outer tar walk, and each layer confirmed
    // whole by its block map and SHA-256 (no chunking, no compression).
    let mut img = Vec::new();
    let _ = synth::write_image(&mut img, Layout::Legacy, Version::V1, Scale::demo(), 1);
    let dir = tempfile::tempdir().ok();
    let Some(dir) = dir else { return };
    let Ok(store) = Store::init(&dir.path().join("s"), StoreConfig::default()) else {
        return;
    };
    let store = Arc::new(store);
    let mut first: &[u8] = &img;
    let _ = wharf_format::ingest::add(&store, &mut first, "seed", &Default::default());
    let mut g = c.benchmark_group("ingest");
    g.throughput(Throughput::Bytes(img.len() as u64));
    g.sample_size(10);
    g.bench_function("re-add a stored demo image (layers reused whole)", |b| {
        b.iter(|| {
            let mut r: &[u8] = &img;
            wharf_format::ingest::add(&store, &mut r, "again", &Default::default()).map(|r| r.len)
        })
    });
    g.finish();
}

fn index_lookups(c: &mut Criterion) {
    const N: usize = 10_000_000;
    let Some(dir) = tempfile::tempdir().ok() else {
        return;
    };
    let Ok(store) = Store::init(&dir.path().join("s"), StoreConfig::default()) else {
        return;
    };
    // 10 million sorted ids, written as one index the way gc writes one.
    let mut ids: Vec<ChunkId> = (0..N as u64)
        .map(|i| ChunkId(*blake3::hash(&i.to_le_bytes()).as_bytes()))
        .collect();
    ids.sort();
    let entries = ids.iter().enumerate().map(|(i, id)| {
        Ok(IndexEntry {
            id: *id,
            pack_no: 0,
            offset: (i as u32) & 0x0fff_ffff,
            stored_len: 8000,
            raw_len: 16384,
        })
    });
    let Ok(name) = pack::write_index(store.backend(), &[PackId([7; 32])], entries) else {
        return;
    };
    let Ok(idx) = IndexFile::open(store.backend(), &name) else {
        return;
    };
    let probes: Vec<ChunkId> = (0..1024u64)
        .map(|i| ChunkId(*blake3::hash(&(i * 9973 % N as u64).to_le_bytes()).as_bytes()))
        .collect();
    let misses: Vec<ChunkId> = (0..1024u64)
        .map(|i| ChunkId(*blake3::hash(&(N as u64 + i).to_le_bytes()).as_bytes()))
        .collect();
    let mut g = c.benchmark_group("index of 10M chunks");
    g.throughput(Throughput::Elements(probes.len() as u64));
    g.bench_function("1024 hits", |b| {
        b.iter(|| probes.iter().filter(|p| idx.lookup(p).is_some()).count())
    });
    g.bench_function("1024 misses", |b| {
        b.iter(|| misses.iter().filter(|p| idx.lookup(p).is_some()).count())
    });
    g.finish();
}

criterion_group!(
    benches,
    chunking,
    hashing,
    zstd_level,
    tar_walk,
    index_lookups
);
criterion_main!(benches);
