//! Hostile inputs: decompression bombs, truncated and corrupt images, tables with wrong encodings or
//! ragged rows, malformed ONNX files (sizes that disagree with dims, absurd dims, external data outside
//! the model folder, files over the limit). Each must be a clear error naming the thing at fault, never a
//! panic, and must not allocate what the header claims.

use crate::common;

use std::path::{Path, PathBuf};

use automm::data::{image::decode_bytes, Table};
use automm::onnx::{read_model, Graph};
use candle_core::Device;
use candle_onnx::onnx::{tensor_proto::DataType, GraphProto, ModelProto, NodeProto, OperatorSetIdProto};
use candle_onnx::onnx::{StringStringEntryProto, TensorProto, ValueInfoProto};
use prost::Message;

fn crc32(bytes: &[u8]) -> u32 {
    let mut c = 0xffff_ffffu32;
    for &b in bytes {
        c ^= b as u32;
        for _ in 0..8 {
            c = if c & 1 != 0 { 0xedb8_8320 ^ (c >> 1) } else { c >> 1 };
        }
    }
    !c
}

fn chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
    out.extend((data.len() as u32).to_be_bytes());
    let mut body = kind.to_vec();
    body.extend(data);
    out.extend(&body);
    out.extend(crc32(&body).to_be_bytes());
}

/// A PNG whose header claims `w` x `h` RGB pixels, with a tiny (far too short) image stream.
fn png_claiming(w: u32, h: u32) -> Vec<u8> {
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = w.to_be_bytes().to_vec();
    ihdr.extend(h.to_be_bytes());
    ihdr.extend([8, 2, 0, 0, 0]);
    chunk(&mut out, b"IHDR", &ihdr);
    chunk(&mut out, b"IDAT", &[0x78, 0x9c, 0x03, 0x00, 0x00, 0x00, 0x00, 0x01]);
    chunk(&mut out, b"IEND", &[]);
    out
}

fn real_png() -> Vec<u8> {
    let img = image::RgbImage::from_fn(64, 64, |x, y| image::Rgb([(x * 4) as u8, (y * 4) as u8, ((x ^ y) * 3) as u8]));
    let mut buf = std::io::Cursor::new(Vec::new());
    img.write_to(&mut buf, image::ImageFormat::Png).unwrap();
    buf.into_inner()
}

#[test]
fn image_bombs_and_broken_images_are_named_errors() {
    let at = Path::new("bad/thing.png");
    // Over the per-side limit: refused from the header, before any allocation.
    let e = decode_bytes(&png_claiming(100_000, 100_000), at, Some(7)).unwrap_err().to_string();
    assert!(e.contains("bad/thing.png") && e.contains("row 7"), "{e}");
    // Within the side limit but 16000 x 16000 x 3 = 768 MB: over the allocation limit.
    let e = decode_bytes(&png_claiming(16_000, 16_000), at, None).unwrap_err().to_string();
    assert!(e.contains("bad/thing.png") && e.to_lowercase().contains("limit"), "{e}");
    // Header fine, data missing.
    let e = decode_bytes(&png_claiming(64, 64), at, None).unwrap_err().to_string();
    assert!(e.contains("cannot decode"), "{e}");
    let png = real_png();
    assert!(decode_bytes(&png, at, None).is_ok());
    for cut in [8, 33, png.len() / 2, png.len() - 13] {
        let e = decode_bytes(&png[..cut], at, Some(1)).unwrap_err().to_string();
        assert!(e.contains("bad/thing.png"), "cut at {cut}: {e}");
    }
    let e = decode_bytes(b"", at, None).unwrap_err().to_string();
    assert!(e.contains("not a recognised image"), "{e}");
    // A JPEG start marker followed by junk.
    let e = decode_bytes(&[0xff, 0xd8, 0xff, 0xe0, 1, 2, 3, 4, 5], at, None).unwrap_err().to_string();
    assert!(e.contains("bad/thing.png"), "{e}");
}

#[test]
fn a_truncated_image_in_a_training_table_names_file_and_row() {
    let dir = tempfile::tempdir().unwrap();
    let csv = automm::app::synth::make_dataset(dir.path(), "train", &[6, 6], 40, 1).unwrap();
    let t = Table::load(&csv, Some("label"), None).unwrap();
    let victim = t.rows[4].image.clone();
    let bytes = std::fs::read(&victim).unwrap();
    std::fs::write(&victim, &bytes[..bytes.len() / 3]).unwrap();
    let (hp, _) =
        automm::train::config::HyperParamsBuilder::new().set_str("optimization.max_epochs=1").unwrap().build().unwrap();
    let req = common::train_request(csv, dir.path().join("out"), hp);
    let e = automm::train::train(&req, |_| {}).unwrap_err().to_string();
    assert!(e.contains(&victim.display().to_string()) && e.contains("row 5"), "{e}");
}

fn table_error(name: &str, bytes: &[u8]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join(name);
    std::fs::write(&p, bytes).unwrap();
    let e = Table::load(&p, Some("label"), None).err().map(|e| e.to_string()).unwrap_or_default();
    assert!(e.contains(name), "error does not name the table: {e:?}");
    e
}

#[test]
fn broken_tables_are_named_errors() {
    // Latin-1 bytes (not UTF-8) in a label.
    let e = table_error("latin1.csv", b"image,label\na.png,caf\xe9\nb.png,tea\n");
    assert!(e.to_lowercase().contains("utf"), "{e}");
    // UTF-16 with a byte-order mark.
    let utf16: Vec<u8> =
        [0xff, 0xfe].into_iter().chain("image,label\na.png,x\n".encode_utf16().flat_map(|u| u.to_le_bytes())).collect();
    let e = table_error("utf16.csv", &utf16);
    assert!(e.contains("UTF-16"), "{e}");
    // A row with more fields than the header, and one with fewer.
    let e = table_error("long.csv", b"image,label\na.png,x\nb.png,y,extra\n");
    assert!(e.contains("row 2"), "{e}");
    let e = table_error("short.csv", b"image,label\na.png,x\nb.png\n");
    assert!(e.contains("row 2"), "{e}");
    let e = table_error("header.csv", b"image,label\n");
    assert!(e.contains("no rows"), "{e}");
    let e = table_error("empty.csv", b"");
    assert!(e.contains("empty"), "{e}");
    let e = table_error("junk.parquet", b"PAR1 this is not parquet");
    assert!(e.contains("Parquet"), "{e}");
    let e = table_error("nul.csv", b"image,label\na.png,\x00\x01\x02\n");
    assert!(!e.is_empty());
}

fn write_model(dir: &Path, name: &str, inits: Vec<TensorProto>) -> PathBuf {
    let m = ModelProto {
        ir_version: 8,
        opset_import: vec![OperatorSetIdProto { domain: String::new(), version: 17 }],
        graph: Some(GraphProto {
            node: vec![NodeProto {
                op_type: "Add".into(),
                name: "add".into(),
                input: vec!["x".into(), "w".into()],
                output: vec!["y".into()],
                ..Default::default()
            }],
            initializer: inits,
            input: vec![ValueInfoProto { name: "x".into(), ..Default::default() }],
            output: vec![ValueInfoProto { name: "y".into(), ..Default::default() }],
            ..Default::default()
        }),
        ..Default::default()
    };
    let p = dir.join(name);
    std::fs::write(&p, m.encode_to_vec()).unwrap();
    p
}

fn weight(dims: Vec<i64>, raw: Vec<u8>) -> TensorProto {
    TensorProto { name: "w".into(), dims, data_type: DataType::Float as i32, raw_data: raw, ..Default::default() }
}

fn external(location: &str, offset: Option<u64>, length: Option<u64>) -> TensorProto {
    let mut kv = vec![StringStringEntryProto { key: "location".into(), value: location.into() }];
    if let Some(o) = offset {
        kv.push(StringStringEntryProto { key: "offset".into(), value: o.to_string() });
    }
    if let Some(l) = length {
        kv.push(StringStringEntryProto { key: "length".into(), value: l.to_string() });
    }
    TensorProto { data_location: 1, external_data: kv, ..weight(vec![4], vec![]) }
}

fn load_err(p: &Path) -> String {
    Graph::load(p, &Device::Cpu, None).err().map(|e| e.to_string()).expect("expected an error")
}

#[test]
fn malformed_onnx_files_are_named_errors() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("junk.onnx"), b"\x08\x07 definitely not a protobuf \xff\xff\xff").unwrap();
    let e = load_err(&d.join("junk.onnx"));
    assert!(e.contains("junk.onnx") && e.contains("not a valid ONNX protobuf"), "{e}");
    let good =
        std::fs::read(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/fixtures/cnn_fixture.onnx")).unwrap();
    std::fs::write(d.join("cut.onnx"), &good[..good.len() / 2]).unwrap();
    let e = load_err(&d.join("cut.onnx"));
    assert!(e.contains("cut.onnx"), "{e}");
    // 24 bytes of data for dims [2, 4] (32 needed).
    let e = load_err(&write_model(d, "short.onnx", vec![weight(vec![2, 4], vec![0; 24])]));
    assert!(e.contains("`w`") && e.contains("32 bytes"), "{e}");
    // Dims whose product is astronomically large, and negative dims: refused without allocating.
    let e = load_err(&write_model(d, "huge.onnx", vec![weight(vec![1 << 30, 1 << 30, 1 << 30], vec![0; 8])]));
    assert!(e.contains("`w`") && e.contains("too large"), "{e}");
    let e = load_err(&write_model(d, "neg.onnx", vec![weight(vec![-4], vec![])]));
    assert!(e.contains("negative"), "{e}");
    // Over the 2 GiB protobuf limit (a sparse file: nothing is read).
    let big = std::fs::File::create(d.join("big.onnx")).unwrap();
    big.set_len(3 << 30).unwrap();
    let e = load_err(&d.join("big.onnx"));
    assert!(e.contains("big.onnx") && e.contains("2 GiB"), "{e}");
}

#[test]
fn external_data_is_read_only_from_inside_the_model_folder() {
    let root = tempfile::tempdir().unwrap();
    let models = root.path().join("models");
    std::fs::create_dir(&models).unwrap();
    let values = [1.5f32, -2.0, 3.25, 4.0];
    let mut blob = vec![0u8; 16];
    blob.extend(values.iter().flat_map(|v| v.to_le_bytes()));
    std::fs::write(models.join("weights.bin"), &blob).unwrap();
    std::fs::write(root.path().join("secret.bin"), &blob).unwrap();

    // Inside the folder, at an offset: read, and equal to the values written.
    let p = write_model(&models, "ok.onnx", vec![external("weights.bin", Some(16), Some(16))]);
    let m = read_model(&p).unwrap();
    let w = &m.graph.as_ref().unwrap().initializer[0];
    assert_eq!(w.raw_data, blob[16..].to_vec());
    let g = Graph::load(&p, &Device::Cpu, None).unwrap();
    let x = candle_core::Tensor::zeros(4, candle_core::DType::F32, &Device::Cpu).unwrap();
    let y = g.run(&[("x", x)]).unwrap();
    assert_eq!(y[0].to_vec1::<f32>().unwrap(), values.to_vec());

    for (name, loc, want) in [
        ("up.onnx", "../secret.bin", "relative path inside the model folder"),
        ("abs.onnx", root.path().join("secret.bin").to_str().unwrap(), "relative path inside the model folder"),
        ("missing.onnx", "nope.bin", "nope.bin"),
    ] {
        let e = load_err(&write_model(&models, name, vec![external(loc, None, None)]));
        assert!(e.contains(name) && e.contains("`w`") && e.contains(want), "{e}");
    }
    #[cfg(unix)]
    {
        std::os::unix::fs::symlink(root.path().join("secret.bin"), models.join("link.bin")).unwrap();
        let e = load_err(&write_model(&models, "link.onnx", vec![external("link.bin", None, None)]));
        assert!(e.contains("outside the model folder"), "{e}");
    }
    let e = load_err(&write_model(&models, "past.onnx", vec![external("weights.bin", Some(24), Some(16))]));
    assert!(e.contains("past the file"), "{e}");
    let e = load_err(&write_model(&models, "size.onnx", vec![external("weights.bin", Some(0), Some(12))]));
    assert!(e.contains("`w`") && e.contains("16 bytes"), "{e}");
}

/// Inputs the fuzzers found crashing (tests/fixtures/fuzz/<target>/): each must now be a plain result.
#[test]
fn fuzz_crashes_stay_fixed() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/fuzz/table_read");
    let tmp = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let p = entry.unwrap().path();
        let e = Table::load(&p, Some("label"), None).err().map(|e| e.to_string());
        assert!(e.as_deref().is_some_and(|e| e.contains("UTF-8")), "{}: {e:?}", p.display());
        // The same bytes with the invalid UTF-8 replaced reach polars, which panics inside its reader (polars-io
        // 0.55 csv/read/builder.rs); read_frame turns that into an error naming the table.
        let text = String::from_utf8_lossy(&std::fs::read(&p).unwrap()).into_owned();
        let q = tmp.path().join("lossy.csv");
        std::fs::write(&q, text).unwrap();
        let e = Table::load(&q, Some("label"), None).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(e.contains("lossy.csv"), "{e}");
    }
}
