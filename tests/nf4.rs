//! NF4 against bitsandbytes' reference kernels (fixture from scripts/gen_fixtures.py): every byte
//! of the quantized state and every dequantized value.

mod common;

use safetensors::{Dtype, SafeTensors};
use swift_rs::quant::nf4::{double_quantize, dynamic_map, mean, nf4_code, Absmax, Nf4};

fn floats(st: &SafeTensors, key: &str) -> Vec<f32> {
    let t = st.tensor(key).unwrap_or_else(|_| panic!("no {key}"));
    match t.dtype() {
        Dtype::F32 => t
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect(),
        Dtype::BF16 => t
            .data()
            .chunks_exact(2)
            .map(|b| half::bf16::from_le_bytes(b.try_into().unwrap()).to_f32())
            .collect(),
        other => panic!("{key}: {other:?}"),
    }
}

/// Equal element for element; on failure says how many differ and shows the first few.
fn assert_same<T: PartialEq + std::fmt::Debug>(got: &[T], want: &[T], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let bad: Vec<(usize, &T, &T)> = (0..got.len())
        .filter(|&i| got[i] != want[i])
        .map(|i| (i, &got[i], &want[i]))
        .collect();
    assert!(
        bad.is_empty(),
        "{what}: {} of {} differ; first (index, ours, bitsandbytes): {:?}",
        bad.len(),
        got.len(),
        &bad[..bad.len().min(5)]
    );
}

fn bytes(st: &SafeTensors, key: &str) -> Vec<u8> {
    let t = st.tensor(key).unwrap();
    assert_eq!(t.dtype(), Dtype::U8, "{key}");
    t.data().to_vec()
}

#[test]
fn code_books_equal_bitsandbytes() {
    let data = std::fs::read(common::fixtures().join("nf4/nf4.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&data).unwrap();
    assert_same(&nf4_code(), &floats(&st, "code"), "nf4 code");
    assert_same(&dynamic_map(), &floats(&st, "dynamic_code"), "dynamic map");
}

#[test]
fn quantized_state_and_dequantized_weights_equal_bitsandbytes() {
    let data = std::fs::read(common::fixtures().join("nf4/nf4.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&data).unwrap();
    for name in ["w64x96", "w37x29", "w5x7", "w200x130"] {
        let w = floats(&st, &format!("{name}.input"));
        let plain = Nf4::quantize(&w, 64, false);
        let tag = format!("{name}.plain");
        assert_same(
            &plain.packed,
            &bytes(&st, &format!("{tag}.packed")),
            &format!("{tag} packed codes"),
        );
        let Absmax::Plain(scales) = &plain.absmax else {
            panic!("plain")
        };
        assert_same(
            scales,
            &floats(&st, &format!("{tag}.absmax")),
            &format!("{tag} absmax"),
        );
        assert_same(
            &plain.dequantize(),
            &floats(&st, &format!("{tag}.dequantized")),
            &format!("{tag} dequantized"),
        );

        // Double quantization: every byte and value, given bitsandbytes' offset (torch's f32
        // mean, whose rounding depends on the CPU; ours is the correctly rounded mean).
        let tag = format!("{name}.dq");
        let bnb_offset = floats(&st, &format!("{tag}.offset"))[0];
        let ours = mean(scales);
        assert!(
            (ours.to_bits() as i64 - bnb_offset.to_bits() as i64).abs() <= 1,
            "{tag}: offset {ours} vs bitsandbytes {bnb_offset}, more than 1 ulp apart"
        );
        let dq = Nf4 {
            absmax: double_quantize(scales, bnb_offset),
            ..plain.clone()
        };
        let Absmax::Double {
            quantized, absmax2, ..
        } = &dq.absmax
        else {
            panic!("double")
        };
        assert_same(
            quantized,
            &bytes(&st, &format!("{tag}.absmax")),
            &format!("{tag} absmax codes"),
        );
        assert_same(
            absmax2,
            &floats(&st, &format!("{tag}.absmax2")),
            &format!("{tag} absmax2"),
        );
        let want = floats(&st, &format!("{tag}.dequantized"));
        assert_same(&dq.dequantize(), &want, &format!("{tag} dequantized"));

        // And with our own offset the weights stay within one 8-bit step of the scale.
        let own = Nf4::quantize(&w, 64, true).dequantize();
        let worst = own
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        let wmax = w.iter().fold(0f32, |m, x| m.max(x.abs()));
        assert!(
            worst <= 0.01 * wmax,
            "{tag}: own offset moves weights by {worst}"
        );
    }
}

#[test]
fn storage_is_about_half_a_byte_per_parameter() {
    let w: Vec<f32> = (0..4096 * 1024u64)
        .map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5)
        .collect();
    let plain = Nf4::quantize(&w, 64, false).bytes() as f64 / w.len() as f64;
    let double = Nf4::quantize(&w, 64, true).bytes() as f64 / w.len() as f64;
    // codes 0.5 + absmax 4/64 = 0.5625; double: 0.5 + 1/64 + 4/(64*256) = 0.5159
    assert!((plain - 0.5625).abs() < 1e-3, "{plain}");
    assert!((double - 0.5159).abs() < 1e-3, "{double}");
}
