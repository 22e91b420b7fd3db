//! Each product path against the dense f32 product, and each instruction set against the
//! portable code.

use super::*;
use half::f16;

/// Deterministic pseudo-random values in `[-1, 1)`.
fn values(n: usize, seed: u32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(2_654_435_761).max(1);
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            (s as f32 / u32::MAX as f32) * 2.0 - 1.0
        })
        .collect()
}

/// Every kernel set this CPU can run.
fn simd_kinds() -> Vec<Simd> {
    let mut out = vec![Simd::Scalar];
    #[cfg(target_arch = "x86_64")]
    {
        out.extend(pulp::x86::V3::try_new().map(Simd::Avx2));
        out.extend(pulp::x86::V4::try_new().map(Simd::Avx512));
    }
    out
}

/// GGUF bytes of `values` quantized as `ty` (the writer's side, for tests).
fn encode(ty: GgmlType, v: &[f32]) -> Vec<u8> {
    let mut out = Vec::new();
    for block in v.chunks_exact(QK) {
        let (lo, hi) = block
            .iter()
            .fold((f32::MAX, f32::MIN), |(a, b), &x| (a.min(x), b.max(x)));
        match ty {
            GgmlType::Q8_0 => {
                let d = lo.abs().max(hi.abs()) / 127.0;
                out.extend(f16::from_f32(d).to_le_bytes());
                out.extend(block.iter().map(|x| (x / d).round() as i8 as u8));
            }
            GgmlType::Q4_1 | GgmlType::Q4_0 => {
                let (d, m) = if ty == GgmlType::Q4_1 {
                    ((hi - lo) / 15.0, lo)
                } else {
                    let d = lo.abs().max(hi.abs()) / 8.0;
                    (d, -8.0 * d)
                };
                out.extend(f16::from_f32(d).to_le_bytes());
                if ty == GgmlType::Q4_1 {
                    out.extend(f16::from_f32(m).to_le_bytes());
                }
                let q = |x: f32| ((x - m) / d).round().clamp(0.0, 15.0) as u8;
                for j in 0..QK / 2 {
                    out.push(q(block[j]) | (q(block[j + QK / 2]) << 4));
                }
            }
            GgmlType::Q5_0 => {
                let d = lo.abs().max(hi.abs()) / 16.0;
                let q = |x: f32| (x / d + 16.0).round().clamp(0.0, 31.0) as u32;
                let mut qh = 0u32;
                let mut qs = [0u8; QK / 2];
                for j in 0..QK / 2 {
                    let (a, b) = (q(block[j]), q(block[j + QK / 2]));
                    qs[j] = (a & 0x0f) as u8 | (((b & 0x0f) as u8) << 4);
                    qh |= (a >> 4) << j | (b >> 4) << (j + QK / 2);
                }
                out.extend(f16::from_f32(d).to_le_bytes());
                out.extend(qh.to_le_bytes());
                out.extend(qs);
            }
            _ => unreachable!(),
        }
    }
    out
}

/// Every path's product equals the f32 product of the dequantized weights: exactly up to f32
/// summation order where activations stay f32 (f32 weights, many rows), within the
/// activations' rounding otherwise (half a low step per element, [`act`]); every instruction
/// set agrees with the portable code.
#[test]
fn products_match_dequantized_f32() -> Result<()> {
    let rows = 70;
    // Odd and even numbers of blocks (the AVX-512 dots read whole pairs of blocks when even).
    for cols in [96, 576, 608] {
        for (ty, q5) in [
            (GgmlType::Q4_1, Q5Form::Bytes),
            (GgmlType::Q4_0, Q5Form::Bytes),
            (GgmlType::Q5_0, Q5Form::Bytes),
            (GgmlType::Q5_0, Q5Form::Bits),
            (GgmlType::Q8_0, Q5Form::Bytes),
            (GgmlType::F32, Q5Form::Bytes),
        ] {
            let v = values(rows * cols, 7);
            let bytes = match ty {
                GgmlType::F32 => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
                _ => encode(ty, &v),
            };
            let w = QMatrix::from_gguf_as("w", ty, &bytes, rows, cols, q5)?;
            let dense = super::ggml::dequantize(ty, &bytes, rows * cols)?;
            for r in [0, 33, rows - 1] {
                assert_eq!(w.row(r), dense[r * cols..(r + 1) * cols], "{ty:?} row {r}");
            }
            for n in [1, 2, 3, 9, 40] {
                let x = values(n * cols, 11 + n as u32);
                let rounded = ty != GgmlType::F32;
                let got = w.matmul(&x, n);
                for i in 0..n {
                    let xi = &x[i * cols..(i + 1) * cols];
                    // One low step per block, from the block's largest |x| (not from QAct).
                    let step: Vec<f32> = xi
                        .chunks(QK)
                        .map(|b| b.iter().fold(0.0f32, |m, v| m.max(v.abs())) / (127.0 * 128.0))
                        .collect();
                    for r in 0..rows {
                        let wr = &dense[r * cols..(r + 1) * cols];
                        let want: f32 = wr.iter().zip(xi).map(|(a, b)| a * b).sum();
                        let rounding: f32 = if rounded {
                            wr.iter()
                                .enumerate()
                                .map(|(c, a)| a.abs() * step[c / QK] * 0.5)
                                .sum()
                        } else {
                            0.0
                        };
                        let err = (got[i * rows + r] - want).abs();
                        assert!(
                            err <= rounding + 1e-4 * want.abs().max(1.0),
                            "{ty:?} {cols} n={n} ({i},{r}): {} vs {want}, bound {rounding}",
                            got[i * rows + r]
                        );
                    }
                }
                let qa: Vec<QAct> = (0..n)
                    .map(|i| QAct::new(&x[i * cols..(i + 1) * cols]))
                    .collect();
                // Every instruction set against the portable code.
                let qs: Vec<&QAct> = if ty == GgmlType::F32 {
                    Vec::new()
                } else {
                    qa.iter().collect()
                };
                let tiles = (!qs.is_empty() && n > INT_ROWS).then(|| Tiles::new(&qs, cols / QK));
                let xr: Vec<XRow<'_>> = (0..n)
                    .map(|i| XRow {
                        f: &x[i * cols..(i + 1) * cols],
                    })
                    .collect();
                let mut scalar = vec![0.0; rows * n];
                run_task(Simd::Scalar, &w, 0, &xr, &qs, tiles.as_ref(), &mut scalar);
                for simd in simd_kinds() {
                    let mut fast = vec![0.0; rows * n];
                    run_task(simd, &w, 0, &xr, &qs, tiles.as_ref(), &mut fast);
                    for (a, b) in scalar.iter().zip(&fast) {
                        assert!(
                            (a - b).abs() <= 1e-4 * a.abs().max(1.0),
                            "{ty:?} {cols} n={n}: {a} vs {b}"
                        );
                    }
                }
            }
        }
    }
    Ok(())
}

#[test]
fn several_matrices_in_one_pass() -> Result<()> {
    let cols = 64;
    let a = QMatrix::from_gguf(
        "a",
        GgmlType::Q8_0,
        &encode(GgmlType::Q8_0, &values(5 * cols, 1)),
        5,
        cols,
    )?;
    let b = QMatrix::from_gguf(
        "b",
        GgmlType::Q4_1,
        &encode(GgmlType::Q4_1, &values(40 * cols, 2)),
        40,
        cols,
    )?;
    let x = values(3 * cols, 3);
    let both = matmul_many(&[&a, &b], &x, 3);
    assert_eq!(both, vec![a.matmul(&x, 3), b.matmul(&x, 3)]);
    Ok(())
}

/// Reused buffers: whatever they held (NaN here, longer or shorter than the product), every
/// value of the product is written, on each path (one row, two, panels, f32 weights).
#[test]
fn products_into_reused_buffers_overwrite_every_value() -> Result<()> {
    let cols = 64;
    let q = QMatrix::from_gguf(
        "q",
        GgmlType::Q4_1,
        &encode(GgmlType::Q4_1, &values(40 * cols, 2)),
        40,
        cols,
    )?;
    let f = QMatrix::from_f32(values(7 * cols, 4), 7, cols);
    for n in [1, 2, 3, 20] {
        let x = values(n * cols, 3);
        let fresh = matmul_many(&[&q, &f], &x, n);
        for len in [0, 5, 40 * 20 + 9] {
            let mut outs = vec![vec![f32::NAN; len], vec![f32::NAN; len]];
            matmul_many_into(&[&q, &f], &x, n, &mut outs);
            assert_eq!(outs, fresh, "{n} rows into buffers of {len}");
        }
    }
    Ok(())
}

#[test]
fn bad_tensors_are_clear_errors() {
    let e = QMatrix::from_gguf("w", GgmlType::Q4_1, &[0; 19], 1, 32);
    assert!(matches!(e, Err(BlockError(m)) if m.contains("19 bytes")));
    let e = QMatrix::from_gguf("w", GgmlType::Q8_0, &[0; 34], 2, 16);
    assert!(matches!(e, Err(BlockError(m)) if m.contains("blocks")));
    let e = QMatrix::from_gguf("w", GgmlType::Other(30), &[0; 34], 1, 32);
    assert!(matches!(e, Err(BlockError(m)) if m.contains("unsupported")));
}

/// Times one decoding step's products at SmolLM2-135M's shapes (`cargo test --release
/// --workspace --lib -- --ignored --nocapture decode_step_products`): a probe, not a gate.
#[test]
#[ignore]
fn decode_step_products() -> Result<()> {
    let shapes = [(960, 576), (576, 576), (3072, 576), (576, 1536)];
    let mats: Vec<QMatrix> = shapes
        .iter()
        .map(|&(r, c)| {
            QMatrix::from_gguf(
                "w",
                GgmlType::Q4_1,
                &encode(GgmlType::Q4_1, &values(r * c, 5)),
                r,
                c,
            )
        })
        .collect::<Result<_>>()?;
    let head = QMatrix::from_gguf(
        "head",
        GgmlType::Q8_0,
        &encode(GgmlType::Q8_0, &values(49152 * 576, 6)),
        49152,
        576,
    )?;
    // In cache: one 576 x 576 matrix again and again.
    let x = values(576, 9);
    let t = std::time::Instant::now();
    for _ in 0..2000 {
        std::hint::black_box(mats[1].matmul(&x, 1));
    }
    let s = t.elapsed().as_secs_f64();
    println!(
        "576x576 in cache, n=1: {:.1} us, {:.1} GMAC/s",
        s / 2000.0 * 1e6,
        2000.0 * 576.0 * 576.0 / s / 1e9
    );
    let s = rayon::scope(|_| {
        let t = std::time::Instant::now();
        for _ in 0..2000 {
            std::hint::black_box(mats[1].matmul(&x, 1));
        }
        t.elapsed().as_secs_f64()
    });
    println!(
        "576x576 in cache from a pool thread, n=1: {:.1} us",
        s / 2000.0 * 1e6
    );
    // One thread, the whole matrix in one task: integer dots (one or two rows) and panels;
    // Q4_1 and Q8_0 (Qwen's Q5_0 in its default 8-bit form, its Q6_K and head).
    let simd = Simd::detect();
    let q8 = QMatrix::from_gguf(
        "w",
        GgmlType::Q8_0,
        &encode(GgmlType::Q8_0, &values(576 * 576, 5)),
        576,
        576,
    )?;
    // Qwen's shapes: its attention and feed-forward matrices are Q5_0 (5-bit codes), its head
    // Q8_0, on 896 columns.
    let qwen = |ty, rows: usize| {
        let v = values(rows * 896, 5);
        QMatrix::from_gguf_as("w", ty, &encode(ty, &v), rows, 896, Q5Form::Bits)
    };
    let (q5_qwen, q8_qwen) = (qwen(GgmlType::Q5_0, 896)?, qwen(GgmlType::Q8_0, 896)?);
    for (m, reps, kind) in [
        (&mats[1], 200, "Q4_1"),
        (&mats[2], 40, "Q4_1"),
        (&q8, 200, "Q8_0"),
        (&q5_qwen, 100, "Q5_0"),
        (&q8_qwen, 100, "Q8_0"),
    ] {
        for n in [1, 2, 3, 4, 16, 64] {
            let x = values(n * m.cols, 9);
            let qa: Vec<QAct> = x.chunks(m.cols).map(QAct::new).collect();
            let qs: Vec<&QAct> = qa.iter().collect();
            let tiles = (n > INT_ROWS).then(|| Tiles::new(&qs, m.cols / QK));
            let xr: Vec<XRow<'_>> = x.chunks(m.cols).map(|f| XRow { f }).collect();
            let mut out = vec![0.0; ROWS_PER_TASK * n];
            let t = std::time::Instant::now();
            for _ in 0..reps {
                for first in (0..m.rows).step_by(ROWS_PER_TASK) {
                    run_task(simd, m, first, &xr, &qs, tiles.as_ref(), &mut out);
                }
            }
            let s = t.elapsed().as_secs_f64() / reps as f64;
            println!(
                "{kind} {}x{} n={n} tasks on one thread: {:.1} us, {:.1} GMAC/s",
                m.rows,
                m.cols,
                s * 1e6,
                (m.rows * m.cols * n) as f64 / s / 1e9
            );
        }
    }
    // One thread, a prompt's panel product: f32 tiles of four activation rows by two weight
    // rows against four.
    for (rows, cols) in [(32, 576), (32, 1536)] {
        let n = 256;
        let panel = values(rows * cols, 4);
        let x = values(n * cols, 9);
        let xr: Vec<XRow<'_>> = x.chunks(cols).map(|f| XRow { f }).collect();
        let mut out = vec![0.0; rows * n];
        let mut secs = [0.0; 2];
        for _ in 0..5 {
            for (k, quads) in [false, true].into_iter().enumerate() {
                let t = std::time::Instant::now();
                for _ in 0..10 {
                    simd.f32_product_in(&panel, cols, &xr, quads, &mut out);
                }
                secs[k] += t.elapsed().as_secs_f64() / 10.0;
            }
        }
        println!(
            "panel {rows}x{cols} by {n} rows: weight pairs {:.2} ms, quads {:.2} ms",
            secs[0] / 5.0 * 1e3,
            secs[1] / 5.0 * 1e3
        );
    }
    let t = std::time::Instant::now();
    for _ in 0..2000 {
        std::hint::black_box(QAct::new(&x));
    }
    println!(
        "rounding 576 activations: {:.2} us",
        t.elapsed().as_secs_f64() / 2000.0 * 1e6
    );
    for n in [1, 16] {
        let xs: Vec<Vec<f32>> = [576, 1536].iter().map(|&c| values(n * c, 9)).collect();
        let run = || {
            for m in &mats {
                std::hint::black_box(m.matmul(if m.cols == 576 { &xs[0] } else { &xs[1] }, n));
            }
        };
        let (layers, h) = rayon::scope(|_| {
            run();
            let t = std::time::Instant::now();
            for _ in 0..30 {
                run();
            }
            let layers = t.elapsed().as_secs_f64();
            let t = std::time::Instant::now();
            for _ in 0..5 {
                std::hint::black_box(head.matmul(&xs[0], n));
            }
            (layers, t.elapsed().as_secs_f64() / 5.0)
        });
        let macs = n as f64 * (30.0 * 3.539e6 + 28.3e6);
        println!(
            "n={n}: 30 layers {:.2} ms, head {:.2} ms, {:.1} GMAC/s",
            layers * 1e3,
            h * 1e3,
            macs / (layers + h) / 1e9
        );
    }
    Ok(())
}

/// One sequence's decoding from memory: single-row dots on one thread over matrices larger
/// than the caches (Qwen's shapes: a Q5_0 stack and a Q8_0 head), in weight bytes a second,
/// beside a plain read of copies of the same bytes (the hardware's prefetching alone), and
/// the panels of a batch of sixteen over the same matrices
/// (`cargo test --release --workspace --lib -- --ignored --nocapture decode_from_memory`): a
/// probe, not a gate.
#[test]
#[ignore]
fn decode_from_memory() -> Result<()> {
    let cols = 896;
    let make = |ty, rows: usize, seed| {
        let v = values(rows * cols, seed);
        QMatrix::from_gguf_as("w", ty, &encode(ty, &v), rows, cols, Q5Form::Bits)
    };
    let mats = [
        make(GgmlType::Q5_0, 200_704, 5)?,
        make(GgmlType::Q8_0, 151_936, 6)?,
    ];
    let words = |v: &[f32]| -> Vec<u8> { v.iter().flat_map(|f| f.to_le_bytes()).collect() };
    let copies: Vec<Vec<u8>> = mats
        .iter()
        .flat_map(|m| match &m.codes {
            Codes::Q4 { d, m, qs } => vec![words(d), words(m), qs.clone()],
            Codes::Q5 { d, qs, qh } => vec![
                words(d),
                qs.clone(),
                qh.iter().flat_map(|w| w.to_le_bytes()).collect(),
            ],
            Codes::Q8 { d, qs } => vec![words(d), qs.iter().map(|&b| b as u8).collect()],
            Codes::F32(v) => vec![words(v)],
        })
        .collect();
    let total: usize = copies.iter().map(Vec::len).sum();
    // Eight bytes an addition, four sums side by side.
    let read = |v: &[u8]| {
        v.as_chunks::<32>().0.iter().fold([0u64; 4], |mut a, c| {
            for (k, w) in c.as_chunks::<8>().0.iter().enumerate() {
                a[k] = a[k].wrapping_add(u64::from_le_bytes(*w));
            }
            a
        })
    };
    let simd = Simd::detect();
    let x = values(cols, 9);
    let qa = QAct::new(&x);
    let xr = [XRow { f: &x }];
    let mut out = vec![0.0; ROWS_PER_TASK];
    // A batch of sixteen sequences: the panels.
    let x16 = values(16 * cols, 10);
    let qa16: Vec<QAct> = x16.chunks(cols).map(QAct::new).collect();
    let qs16: Vec<&QAct> = qa16.iter().collect();
    let tiles = Tiles::new(&qs16, cols / QK);
    let xr16: Vec<XRow<'_>> = x16.chunks(cols).map(|f| XRow { f }).collect();
    let mut out16 = vec![0.0; ROWS_PER_TASK * 16];
    for round in 0..3 {
        let t = std::time::Instant::now();
        for m in &mats {
            for first in (0..m.rows).step_by(ROWS_PER_TASK) {
                run_task(simd, m, first, &xr, &[&qa], None, &mut out);
            }
        }
        let dots = t.elapsed().as_secs_f64();
        let t = std::time::Instant::now();
        std::hint::black_box(copies.iter().map(|c| read(c)).collect::<Vec<_>>());
        let plain = t.elapsed().as_secs_f64();
        let t = std::time::Instant::now();
        for m in &mats {
            for first in (0..m.rows).step_by(ROWS_PER_TASK) {
                run_task(simd, m, first, &xr16, &qs16, Some(&tiles), &mut out16);
            }
        }
        let panels = t.elapsed().as_secs_f64();
        let macs: usize = mats.iter().map(|m| 16 * m.rows * m.cols).sum();
        println!(
            "round {round}: {} MB, dots {:.1} ms = {:.2} GB/s, plain read {:.1} ms = {:.2} GB/s, \
             16 rows {:.1} ms = {:.1} GMAC/s",
            total / 1_000_000,
            dots * 1e3,
            total as f64 / dots / 1e9,
            plain * 1e3,
            total as f64 / plain / 1e9,
            panels * 1e3,
            macs as f64 / panels / 1e9
        );
    }
    Ok(())
}

#[test]
fn row_spans_keep_each_rows_path() {
    for batch in [1, 2, 3, 4, 5, 7, 16, 33] {
        for seq in [1, 2, 9, 31, 64, 100, 128, 257] {
            for target in [32, 40, 256, 512] {
                let spans = super::row_spans(batch, seq, target);
                let rows: Vec<usize> = spans.iter().map(|s| batch * s.len()).collect();
                let what = format!("batch {batch}, seq {seq}, target {target}: {spans:?}");
                assert_eq!(spans.first().map(|s| s.start), Some(0), "{what}");
                assert_eq!(spans.last().map(|s| s.end), Some(seq), "{what}");
                assert!(spans.windows(2).all(|w| w[0].end == w[1].start), "{what}");
                if spans.len() > 1 {
                    let (last, before) = rows.split_last().unwrap_or((&0, &[]));
                    assert!(before.iter().all(|r| r % TILE == 0), "{what}");
                    assert_eq!(last % TILE, (batch * seq) % TILE, "{what}");
                    assert!(rows.iter().all(|&r| r >= PANEL_ROWS), "{what}");
                }
            }
        }
    }
    // The bench's batch of 16 prompts of 128 tokens: 8 spans of 256 rows.
    let spans = super::row_spans(16, 128, 256);
    assert_eq!(spans.len(), 8);
    assert!(spans.iter().all(|s| s.len() == 16));
    // A single prompt of 128 tokens, or a decoding step, is not split.
    let whole = |batch, seq| {
        super::row_spans(batch, seq, 256)
            .into_iter()
            .eq(Some(0..seq))
    };
    assert!(whole(1, 128) && whole(16, 1));
}

/// Four f32 weight rows a tile give every dot bit for bit as two do (prompts must not depend
/// on the tile).
#[test]
fn f32_quads_equal_pairs_bit_for_bit() {
    for simd in simd_kinds() {
        for (rows, cols) in [(1, 40), (5, 608), (7, 33), (12, 96)] {
            let panel = values(rows * cols, 4);
            for n in [1, 4, 9, 35] {
                let x = values(n * cols, 8 + n as u32);
                let xs: Vec<XRow<'_>> = x.chunks(cols).map(|f| XRow { f }).collect();
                let (mut pairs, mut quads) = (vec![0.0; rows * n], vec![0.0; rows * n]);
                simd.f32_product_in(&panel, cols, &xs, false, &mut pairs);
                simd.f32_product_in(&panel, cols, &xs, true, &mut quads);
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&pairs), bits(&quads), "{rows}x{cols}, n={n}");
            }
        }
    }
}

/// The transposed lane sums are each vector's lane-order sum, bit for bit, signed zeros,
/// infinities and cancellation included.
#[cfg(target_arch = "x86_64")]
#[test]
fn transposed_lane_sums_equal_lane_order_sums() {
    let Some(simd) = pulp::x86::V4::try_new() else {
        return;
    };
    let mut pool = values(16 * 16 * 20, 11);
    for (i, v) in pool.iter_mut().enumerate() {
        // Magnitudes far apart (rounding depends on the order), and special values.
        *v *= [1.0, 1e-7, 3e7, 1.0][i % 4];
        match i % 97 {
            0 => *v = -0.0,
            1 => *v = f32::INFINITY,
            _ => {}
        }
    }
    let neg_zeros = [-0.0f32; 16];
    for chunk in pool.chunks_exact(256) {
        let rows: [[f32; 16]; 16] = std::array::from_fn(|r| {
            if r == 5 {
                neg_zeros
            } else {
                std::array::from_fn(|l| chunk[r * 16 + l])
            }
        });
        let v16: [core::arch::x86_64::__m512; 16] = rows.map(pulp::cast);
        let want: Vec<u32> = v16.iter().map(|&v| avx512::hsum(v).to_bits()).collect();
        let got = simd.vectorize(|| avx512::hsums16(simd, v16));
        assert_eq!(got.map(f32::to_bits).to_vec(), want);
        let v8: [core::arch::x86_64::__m512; 8] = std::array::from_fn(|r| v16[r + 3]);
        let got = simd.vectorize(|| avx512::hsums8(simd, v8));
        assert_eq!(got.map(f32::to_bits).to_vec(), want[3..11].to_vec());
    }
}

/// The AVX2 transposed sums, as [`transposed_lane_sums_equal_lane_order_sums`].
#[cfg(target_arch = "x86_64")]
#[test]
fn avx2_transposed_lane_sums_equal_lane_order_sums() {
    let Some(simd) = pulp::x86::V3::try_new() else {
        return;
    };
    let mut pool = values(8 * 8 * 40, 13);
    for (i, v) in pool.iter_mut().enumerate() {
        *v *= [1.0, 1e-7, 3e7, 1.0][i % 4];
        match i % 89 {
            0 => *v = -0.0,
            1 => *v = f32::NEG_INFINITY,
            _ => {}
        }
    }
    for (c, chunk) in pool.chunks_exact(64).enumerate() {
        let rows: [[f32; 8]; 8] = std::array::from_fn(|r| {
            if r == c % 8 {
                [-0.0; 8]
            } else {
                std::array::from_fn(|l| chunk[r * 8 + l])
            }
        });
        let v: [core::arch::x86_64::__m256; 8] = rows.map(pulp::cast);
        let want: Vec<u32> = rows
            .iter()
            .map(|r| r.iter().sum::<f32>().to_bits())
            .collect();
        let got = simd.vectorize(|| avx2::hsums8(simd, v));
        assert_eq!(got.map(f32::to_bits).to_vec(), want);
    }
}

/// Products of more than `INT_ROWS` activation rows are the scalar integer dots bit for bit,
/// on every instruction set and for every quantized type: partial panels, a task starting
/// past row 0, a short last tile, block counts of each remainder by the kernels' steps of
/// blocks (19, 20 and 21 blocks), a zero block and an outlier.
#[test]
fn panel_products_equal_scalar_dots_bit_for_bit() -> Result<()> {
    let (rows, first) = (40, 3);
    for (cols, ty, q5) in [608, 640, 672].into_iter().flat_map(|cols| {
        [
            (GgmlType::Q4_1, Q5Form::Bytes),
            (GgmlType::Q5_0, Q5Form::Bits),
            (GgmlType::Q5_0, Q5Form::Bytes),
            (GgmlType::Q8_0, Q5Form::Bytes),
        ]
        .map(|(ty, q5)| (cols, ty, q5))
    }) {
        let mut v = values(rows * cols, 5);
        v[..QK].fill(0.0);
        let w = QMatrix::from_gguf_as("w", ty, &encode(ty, &v), rows, cols, q5)?;
        for n in [INT_ROWS + 1, 4, 8, 9, 17, 33] {
            let mut x = values(n * cols, 7 + n as u32);
            x[cols..cols + QK].fill(0.0);
            x[2 * cols + 5] = 1.0e4;
            let qa: Vec<QAct> = x.chunks(cols).map(QAct::new).collect();
            let qs: Vec<&QAct> = qa.iter().collect();
            let tiles = Some(Tiles::new(&qs, cols / QK));
            let xs: Vec<XRow<'_>> = x.chunks(cols).map(|f| XRow { f }).collect();
            // `[n, rows]`: activation row after activation row.
            let expect: Vec<u32> = qs
                .iter()
                .flat_map(|x| {
                    let w = &w;
                    (first..rows).map(move |r| {
                        match w.q_row(r) {
                            QRow::Q4(r) => act::scalar_q4(r, x),
                            QRow::Q5(r) => act::scalar_q5(r, x),
                            QRow::Q8(r) => act::scalar_q8(r, x),
                        }
                        .to_bits()
                    })
                })
                .collect();
            for simd in simd_kinds() {
                let mut out = vec![0.0; (rows - first) * n];
                let layout = run_task(simd, &w, first, &xs, &qs, tiles.as_ref(), &mut out);
                assert_eq!(layout, Layout::ActivationsFirst);
                let got: Vec<u32> = out.iter().map(|v| v.to_bits()).collect();
                assert_eq!(got, expect, "{ty:?} {q5:?} {cols} n={n}");
            }
        }
    }
    Ok(())
}

/// The kernels' code pairs, decoded in registers, are [`panel::Panel::pairs`] word for word:
/// every type, every block, fifth bits set and clear. (On a CPU with neither AVX2 nor AVX-512
/// this compares nothing, and says so.)
#[cfg(target_arch = "x86_64")]
#[test]
fn code_pairs_equal_their_definition() -> Result<()> {
    use panel::Panel;
    type Decoder = Box<dyn Fn(QRow<'_>, usize) -> [i32; 16]>;
    let mut decoders: Vec<(&str, Decoder)> = Vec::new();
    if let Some(v3) = pulp::x86::V3::try_new() {
        decoders.push(("avx2", Box::new(move |row, b| avx2::code_pairs(v3, row, b))));
    }
    if let Some(v4) = pulp::x86::V4::try_new() {
        decoders.push((
            "avx512",
            Box::new(move |row, b| avx512::code_pairs(v4, row, b)),
        ));
    }
    if decoders.is_empty() {
        eprintln!("no AVX2: the portable code decodes no pairs, nothing to compare");
        return Ok(());
    }
    let (rows, cols) = (7, 640);
    for (ty, q5) in [
        (GgmlType::Q4_1, Q5Form::Bytes),
        (GgmlType::Q5_0, Q5Form::Bits),
        (GgmlType::Q8_0, Q5Form::Bytes),
    ] {
        let bytes = encode(ty, &values(rows * cols, 9));
        let w = QMatrix::from_gguf_as("w", ty, &bytes, rows, cols, q5)?;
        for r in 0..rows {
            let row = w.q_row(r);
            for b in 0..cols / QK {
                let expect = match row {
                    QRow::Q4(q) => q.pairs(b),
                    QRow::Q5(q) => q.pairs(b),
                    QRow::Q8(q) => q.pairs(b),
                };
                for (name, decode) in &decoders {
                    assert_eq!(decode(row, b), expect, "{name} {ty:?} row {r} block {b}");
                }
            }
        }
    }
    Ok(())
}

/// Tiles rounded straight from f32 rows (the AVX-512 and AVX2 paths) are the rounded rows'
/// tiles bit for bit: zero, infinite, NaN, huge (the sum overflows) and tiny blocks included, a
/// short last tile and an odd block count. (The portable code builds tiles from the rounded
/// rows: on a CPU with neither this compares nothing, and says so.)
#[test]
fn tiles_from_f32_rows_equal_rounded_rows() {
    let from_f32: Vec<Simd> = simd_kinds()
        .into_iter()
        .filter(|s| !s.panels_from_rows())
        .collect();
    if from_f32.is_empty() {
        eprintln!("no AVX2 or AVX-512: tiles are built from rounded rows only, nothing to compare");
        return;
    }
    let cols = 19 * QK;
    for n in [INT_ROWS + 1, 16, 21] {
        let mut x = values(n * cols, 40 + n as u32);
        x[..QK].fill(0.0);
        x[cols + 3] = f32::INFINITY;
        x[2 * cols + QK + 7] = f32::NAN;
        x[2 * cols + 2 * QK..2 * cols + 3 * QK].fill(3.0e38);
        for v in &mut x[3 * QK..4 * QK] {
            *v *= 1.0e-39;
        }
        x[4 * QK + 1] = -0.0;
        let qa: Vec<QAct> = x.chunks(cols).map(QAct::new).collect();
        let qs: Vec<&QAct> = qa.iter().collect();
        let want = Tiles::new(&qs, cols / QK).bits();
        for &simd in &from_f32 {
            let got = simd.tiles(&x, n, cols, &qs).bits();
            let first = |a: &[u32], b: &[u32]| a.iter().zip(b).position(|(a, b)| a != b);
            assert!(
                got == want,
                "n={n}: tiles differ: pairs at {:?}, scales at {:?}, sums at {:?}",
                got.0.iter().zip(&want.0).position(|(a, b)| a != b),
                first(&got.1, &want.1),
                first(&got.2, &want.2)
            );
        }
    }
}

/// The name the benches print is the kernel set the products run with: without
/// `CROSSLM_SIMD`, the widest this CPU has.
#[test]
fn kernels_names_the_chosen_set() {
    let name = kernels();
    assert!(
        ["avx512+vnni", "avx512", "avx2", "scalar"].contains(&name),
        "{name}"
    );
    if std::env::var_os("CROSSLM_SIMD").is_none() {
        let widest = match simd_kinds().last() {
            #[cfg(target_arch = "x86_64")]
            Some(Simd::Avx512(_)) => "avx512",
            #[cfg(target_arch = "x86_64")]
            Some(Simd::Avx2(_)) => "avx2",
            _ => "scalar",
        };
        assert!(
            name.starts_with(widest),
            "{name} on a CPU whose widest is {widest}"
        );
    }
}

/// A Q5_0 matrix gives the same numbers, bit for bit, whether it is held as 5-bit or as 8-bit
/// codes: on every instruction set, for the dots of one or two activation rows and the
/// panels, with odd and even numbers of blocks.
#[test]
fn q5_forms_give_the_same_numbers() -> Result<()> {
    let rows = 37;
    for cols in [96, 608] {
        let bytes = encode(GgmlType::Q5_0, &values(rows * cols, 5));
        let bits = QMatrix::from_gguf_as("w", GgmlType::Q5_0, &bytes, rows, cols, Q5Form::Bits)?;
        let q8 = QMatrix::from_gguf_as("w", GgmlType::Q5_0, &bytes, rows, cols, Q5Form::Bytes)?;
        assert_eq!((bits.path(), q8.path()), (Path::Q5, Path::Q8));
        for n in [1, 2, 3, 9, 40] {
            let x = values(n * cols, 3 + n as u32);
            let qa: Vec<QAct> = (0..n)
                .map(|i| QAct::new(&x[i * cols..(i + 1) * cols]))
                .collect();
            let qs: Vec<&QAct> = qa.iter().collect();
            let tiles = (n > INT_ROWS).then(|| Tiles::new(&qs, cols / QK));
            let xr: Vec<XRow<'_>> = (0..n)
                .map(|i| XRow {
                    f: &x[i * cols..(i + 1) * cols],
                })
                .collect();
            for simd in simd_kinds() {
                let (mut a, mut b) = (vec![0.0; rows * n], vec![0.0; rows * n]);
                run_task(simd, &bits, 0, &xr, &qs, tiles.as_ref(), &mut a);
                run_task(simd, &q8, 0, &xr, &qs, tiles.as_ref(), &mut b);
                let same = a.iter().zip(&b).all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(same, "{cols} n={n}: {:?} vs {:?}", &a[..4], &b[..4]);
            }
            let (a, b) = (bits.matmul(&x, n), q8.matmul(&x, n));
            assert!(
                a.iter().zip(&b).all(|(a, b)| a.to_bits() == b.to_bits()),
                "{cols} n={n}"
            );
        }
    }
    Ok(())
}

/// Lays out a matrix's rows for the panels ([`panel::TaskRows`]) in tasks of `rows`, as the
/// kernels do before their products.
#[cfg(target_arch = "x86_64")]
struct LayoutRun<'a, D> {
    decode: D,
    w: &'a QMatrix,
    rows: usize,
    group: usize,
}

#[cfg(target_arch = "x86_64")]
impl<D: Fn(QRow<'_>, usize) -> [i32; 16] + Copy> pulp::NullaryFnOnce for LayoutRun<'_, D> {
    type Output = ();
    #[inline(always)]
    fn call(self) {
        for first in (0..self.w.rows).step_by(self.rows) {
            let t = panel::TaskRows::new(
                self.w,
                first,
                self.rows.min(self.w.rows - first),
                self.group,
                self.decode,
            );
            std::hint::black_box(&t);
            t.recycle();
        }
    }
}

/// Times the panels' layout alone, a block at a time, with each instruction set's decoder
/// (`cargo test --release --workspace --lib -- --ignored --nocapture layout_probe`): a probe,
/// not a gate.
#[test]
#[ignore]
#[cfg(target_arch = "x86_64")]
fn layout_probe() -> Result<()> {
    let (Some(v3), Some(v4)) = (pulp::x86::V3::try_new(), pulp::x86::V4::try_new()) else {
        return Ok(());
    };
    for (ty, cols) in [
        (GgmlType::Q8_0, 896),
        (GgmlType::Q5_0, 896),
        (GgmlType::Q8_0, 4864),
    ] {
        let rows = 896;
        let v = values(rows * cols, 5);
        let w = QMatrix::from_gguf_as("w", ty, &encode(ty, &v), rows, cols, Q5Form::Bits)?;
        for (task, group) in [(32, 4), (4, 4)] {
            for isa in ["avx2", "avx512"] {
                let t = std::time::Instant::now();
                for _ in 0..50 {
                    if isa == "avx2" {
                        v3.vectorize(LayoutRun {
                            decode: panel::decoder(
                                #[inline(always)]
                                |row: QRow<'_>, b: usize| avx2::code_pairs(v3, row, b),
                            ),
                            w: &w,
                            rows: task,
                            group,
                        });
                    } else {
                        v4.vectorize(LayoutRun {
                            decode: panel::decoder(
                                #[inline(always)]
                                |row: QRow<'_>, b: usize| avx512::code_pairs(v4, row, b),
                            ),
                            w: &w,
                            rows: task,
                            group,
                        });
                    }
                }
                let s = t.elapsed().as_secs_f64() / 50.0;
                let blocks = rows * cols / QK;
                println!(
                    "{isa} {ty:?} {rows}x{cols} tasks of {task}: {:.1} us, {:.2} ns a block",
                    s * 1e6,
                    s * 1e9 / blocks as f64
                );
            }
        }
    }
    Ok(())
}
