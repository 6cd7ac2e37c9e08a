//! Parsing what comes back: every message of the bounce corpus (tests/data/bounces: Postfix,
//! Exim, qmail, Sendmail, Office 365, Exchange, Gmail, Yahoo) read and classified, as
//! `mxpipe inbound` does for each arriving report. Throughput is in bounces.
//!
//! Run: `cargo bench --bench inbound`

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use mxpipe::engine::classify::Classifier;
use mxpipe::inbound::report;
use std::hint::black_box;
use std::path::Path;

fn corpus() -> Vec<Vec<u8>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/bounces");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .expect("tests/data/bounces")
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "eml"))
        .collect();
    files.sort();
    files.iter().map(|p| std::fs::read(p).unwrap()).collect()
}

fn parse_corpus(c: &mut Criterion) {
    let messages = corpus();
    let classifier = Classifier::default();
    let mut g = c.benchmark_group("inbound");
    g.throughput(Throughput::Elements(messages.len() as u64));
    g.bench_function("parse_and_classify_corpus", |b| {
        b.iter(|| {
            for m in &messages {
                let r = report::parse(black_box(m), &classifier).expect("corpus parses");
                black_box(r);
            }
        })
    });
    g.finish();
}

criterion_group!(benches, parse_corpus);
criterion_main!(benches);
