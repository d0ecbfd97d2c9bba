//! Our kernels per instruction set on the same inputs, in one run (criterion): the packed sgemm's AVX2
//! and AVX-512 tiles on Swin-Tiny's linear-layer shapes at batch 8 (rows = tokens x images), against the
//! `gemm` crate (candle's matmul) as the baseline; the channel-blocked 1x1 conv's scalar, AVX2 and
//! AVX-512 tiles on EfficientNet-Lite0's 1x1 shapes at batch 1 and 8; dense and grouped convolutions
//! (ResNet, DenseNet, RegNetY shapes at batch 8) as im2col + the `gemm` crate in NCHW against the
//! channel-blocked direct conv per ISA.
//!
//!   cargo bench --bench kernels

use automm::onnx::kernels::nchwc;
use automm::onnx::kernels::sgemm::{best_isa, matmul_packed_on, PackedB};
use automm::onnx::kernels::{conv_grouped, ConvGeom, Isa};
use candle_core::{Device, Tensor};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

/// (rows, k, n) of Swin-Tiny's qkv, fc2, stage-2 qkv and stage-3 fc1 products at batch 8, and LeViT's.
const SHAPES: &[(usize, usize, usize)] = &[
    (25088, 96, 288),
    (25088, 384, 96),
    (6272, 192, 576),
    (1568, 384, 1536),
    // LeViT-128S's linear layers at batch 8 (196, 49 and 16 tokens).
    (1568, 128, 256),
    (392, 512, 256),
    (128, 768, 384),
];

fn bench(c: &mut Criterion) {
    // As the automm binary does: big outputs are reused, not page-faulted in afresh on every call.
    automm::onnx::kernels::keep_freed_memory();
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

/// (c, m, pixels) of EfficientNet-Lite0's 1x1 convs: an expansion and a projection per resolution,
/// and the 1280-channel head.
const PW_SHAPES: &[(usize, usize, usize)] = &[
    (16, 96, 112 * 112),
    (144, 24, 56 * 56),
    (40, 240, 28 * 28),
    (480, 80, 14 * 14),
    (112, 672, 14 * 14),
    (1152, 192, 7 * 7),
    (320, 1280, 7 * 7),
];

fn pointwise(c: &mut Criterion) {
    let best = Isa::detect(false);
    let isas: Vec<Isa> = [Isa::Scalar, Isa::Avx2, Isa::Avx512].into_iter().filter(|&i| i <= best).collect();
    let mut group = c.benchmark_group("pointwise");
    group.sample_size(10);
    for &(ch, m, hw) in PW_SHAPES {
        for n in [1usize, 8] {
            let x: Vec<f32> = (0..n * ch * hw).map(|i| ((i * 7919 % 101) as f32 - 50.0) / 50.0).collect();
            let w: Vec<f32> = (0..m * ch).map(|i| ((i * 31 % 97) as f32 - 48.0) / 48.0).collect();
            let (xb, wp, bias) = (nchwc::block(&x, n, ch, hw), nchwc::pack_pointwise(&w, m, ch), vec![0.1f32; m]);
            let shape = format!("n{n}_c{ch}_m{m}_px{hw}");
            group.throughput(Throughput::Elements((2 * n * hw * ch * m) as u64));
            for &isa in isas.iter().filter(|&&i| i != Isa::Scalar || n == 1) {
                group.bench_with_input(BenchmarkId::new(format!("{isa:?}"), &shape), &(), |b, _| {
                    b.iter(|| nchwc::pointwise_with(&xb, (n, ch, hw), &wp, &bias, m, nchwc::Act::NONE, isa))
                });
            }
        }
    }
    group.finish();
}

/// (c, m, h=w, k, stride, groups) at batch 8: ResNet's, EfficientNet's and MobileNetV3's stems,
/// ResNet's 3x3 convs per stage, DenseNet's bottleneck 1x1 and growth 3x3, a RegNetY grouped 3x3 (group
/// width 16).
const CONV_SHAPES: &[(usize, usize, usize, usize, usize, usize)] = &[
    (3, 64, 224, 7, 2, 1),
    (3, 32, 224, 3, 2, 1),
    (3, 16, 224, 3, 2, 1),
    (64, 64, 56, 3, 1, 1),
    (128, 128, 28, 3, 1, 1),
    (256, 256, 14, 3, 1, 1),
    (512, 512, 7, 3, 1, 1),
    (256, 128, 28, 1, 1, 1),
    (128, 32, 28, 3, 1, 1),
    (144, 144, 28, 3, 1, 9),
];

fn convs(c: &mut Criterion) {
    let best = Isa::detect(false);
    let mut group = c.benchmark_group("conv");
    group.sample_size(10);
    let n = 8;
    for &(ch, m, hw, k, s, groups) in CONV_SHAPES {
        let p = k / 2;
        let g = ConvGeom { k: (k, k), s: (s, s), d: (1, 1), pads: [p; 4] };
        let x: Vec<f32> = (0..n * ch * hw * hw).map(|i| ((i * 7919 % 101) as f32 - 50.0) / 50.0).collect();
        let w: Vec<f32> = (0..m * ch / groups * k * k).map(|i| ((i * 31 % 97) as f32 - 48.0) / 48.0).collect();
        let x = Tensor::from_vec(x, (n, ch, hw, hw), &Device::Cpu).unwrap();
        let w = Tensor::from_vec(w, (m, ch / groups, k, k), &Device::Cpu).unwrap();
        let b = Tensor::zeros(m, candle_core::DType::F32, &Device::Cpu).unwrap();
        let (oh, ow) = g.out_size(hw, hw);
        let shape = format!("c{ch}_m{m}_{hw}px_k{k}s{s}g{groups}");
        group.throughput(Throughput::Elements((2 * n * oh * ow * m * ch / groups * k * k) as u64));
        // NCHW: im2col + the `gemm` crate (what these convs ran on before the blocked kernel).
        group.bench_with_input(BenchmarkId::new("GemmCrate", &shape), &(), |bch, _| {
            bch.iter(|| conv_grouped(&x, &w, Some(&b), g, groups, Some((0.0, f32::MAX))).unwrap())
        });
        // A stem: NCHW input of a few channels straight into blocked output.
        if groups == 1 && ch % nchwc::LANES != 0 {
            let xs = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let wp = nchwc::pack_dense(&w.flatten_all().unwrap().to_vec1::<f32>().unwrap(), m, ch * k * k);
            let bias = vec![0f32; m];
            let act = nchwc::Act::clamp(0.0, f32::MAX);
            group.bench_with_input(BenchmarkId::new("StemToBlocked", &shape), &(), |bch, _| {
                bch.iter(|| nchwc::dense_to_blocked(&xs, (n, ch, hw, hw), &wp, &bias, m, g, act, false))
            });
        }
        // The channel-blocked direct conv (input already blocked, weights packed once, as in a plan).
        if (ch / groups) % nchwc::LANES == 0 && (m / groups) % nchwc::LANES == 0 {
            let xb = nchwc::block(&x.flatten_all().unwrap().to_vec1::<f32>().unwrap(), n, ch, hw * hw);
            let wp = nchwc::pack_dense_blocked(
                &w.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                (m, groups),
                ch / groups,
                (k, k),
            );
            let bias = vec![0f32; m];
            let act = nchwc::Act::clamp(0.0, f32::MAX);
            for isa in [Isa::Avx2, Isa::Avx512].into_iter().filter(|&i| i <= best) {
                group.bench_with_input(BenchmarkId::new(format!("Blocked{isa:?}"), &shape), &(), |bch, _| {
                    bch.iter(|| nchwc::dense_blocked(&xb, (n, ch, hw, hw), &wp, &bias, (m, groups), g, act, isa))
                });
            }
        }
    }
    group.finish();
}

criterion_group!(benches, bench, pointwise, convs);
criterion_main!(benches);
