//! Our kernels per instruction set on the same inputs, in one run (criterion): the packed sgemm's AVX2
//! and AVX-512 tiles on Swin-Tiny's linear-layer shapes at batch 8 (rows = tokens x images), against the
//! `gemm` crate (candle's matmul) as the baseline.
//!
//!   cargo bench --bench kernels

use automm::onnx::kernels::sgemm::{best_isa, matmul_packed_on, Isa, PackedB};
use candle_core::{Device, Tensor};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

/// (rows, k, n) of Swin-Tiny's qkv, fc2, stage-2 qkv and stage-3 fc1 products at batch 8.
const SHAPES: &[(usize, usize, usize)] = &[(25088, 96, 288), (25088, 384, 96), (6272, 192, 576), (1568, 384, 1536)];

fn bench(c: &mut Criterion) {
    let Some(best) = best_isa() else {
        eprintln!("no AVX2+FMA here: the sgemm tiles do not run on this CPU");
        return;
    };
    let isas: Vec<Isa> = if best == Isa::Avx512 { vec![Isa::Avx2, Isa::Avx512] } else { vec![Isa::Avx2] };
    let mut group = c.benchmark_group("sgemm");
    group.sample_size(10);
    for &(rows, k, n) in SHAPES {
        let a: Vec<f32> = (0..rows * k).map(|i| ((i * 7919 % 101) as f32 - 50.0) / 50.0).collect();
        let w: Vec<f32> = (0..k * n).map(|i| ((i * 31 % 97) as f32 - 48.0) / 48.0).collect();
        let packed = PackedB::new(&w, k, n);
        let shape = format!("{rows}x{k}x{n}");
        group.throughput(Throughput::Elements((2 * rows * k * n) as u64));
        for &isa in &isas {
            group.bench_with_input(BenchmarkId::new(format!("{isa:?}"), &shape), &(), |b, _| {
                b.iter(|| matmul_packed_on(isa, &a, &packed, None, &|_| {}))
            });
        }
        let (ta, tw) = (
            Tensor::from_slice(&a, (rows, k), &Device::Cpu).unwrap(),
            Tensor::from_slice(&w, (k, n), &Device::Cpu).unwrap(),
        );
        group.bench_with_input(BenchmarkId::new("gemm crate", &shape), &(), |b, _| b.iter(|| ta.matmul(&tw).unwrap()));
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
