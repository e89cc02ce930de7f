//! Issue 17: compressed-tensors out, GPTQ / AWQ / compressed-tensors in. The checks against
//! the libraries themselves (transformers, llm-compressor, GPTQModel, AutoAWQ, llama.cpp) need
//! a Python environment and run in `scripts/peers/interop_check.py` (results in BENCHMARKS.md);
//! these tests cover tandem's side on the bundled model: the export's layout, the lossless
//! way back to GGUF, and every bad-input case of the importer.

use crate::common::*;
use safetensors::{Dtype, SafeTensors};
use std::path::{Path, PathBuf};

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn ok(args: &[&str]) -> String {
    let out = tandem(args);
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The command fails with one line on stderr containing every needle, and no panic.
fn fails(args: &[&str], needles: &[&str]) {
    let out = tandem(args);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{args:?} succeeded");
    assert!(!err.contains("panicked"), "{args:?} panicked: {err}");
    assert_eq!(
        err.trim().lines().count(),
        1,
        "{args:?}: not one line: {err}"
    );
    for n in needles {
        assert!(err.contains(n), "{args:?}: '{n}' not in: {err}");
    }
}

/// stories260K exported as compressed-tensors q4_0 into `dir/ct`.
fn export(dir: &Path) -> PathBuf {
    let out = dir.join("ct");
    ok(&[
        "quantize",
        s(&stories()),
        "--out",
        s(&out),
        "--format",
        "compressed-tensors",
        "--scheme",
        "q4_0",
        "-q",
    ]);
    out
}

#[test]
fn export_is_compressed_tensors_and_converts_back_to_the_same_gguf_bytes() {
    let tmp = tempfile::tempdir().unwrap();
    let ct = export(tmp.path());
    // config.json: the quantization config compressed-tensors reads.
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(ct.join("config.json")).unwrap()).unwrap();
    let q = &cfg["quantization_config"];
    assert_eq!(q["quant_method"], "compressed-tensors");
    assert_eq!(q["format"], "pack-quantized");
    let w = &q["config_groups"]["group_0"]["weights"];
    assert_eq!(
        (
            w["num_bits"].as_u64(),
            w["group_size"].as_u64(),
            w["symmetric"].as_bool()
        ),
        (Some(4), Some(32), Some(true))
    );
    let ignore: Vec<&str> = q["ignore"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    // Attention kept 16-bit, the tied head, and down_proj (172 columns: no whole blocks).
    for m in [
        "model.layers.0.self_attn.q_proj",
        "model.layers.4.self_attn.o_proj",
        "lm_head",
        "model.layers.0.mlp.down_proj",
    ] {
        assert!(ignore.contains(&m), "{m} not in ignore: {ignore:?}");
    }
    assert!(ct.join("tokenizer.json").exists() && ct.join("tokenizer_config.json").exists());
    // The tensors: packed I32, F16 scales, I64 shape; kept ones as they were.
    let bytes = std::fs::read(ct.join("model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let packed = st
        .tensor("model.layers.0.mlp.gate_proj.weight_packed")
        .unwrap();
    assert_eq!(
        (packed.dtype(), packed.shape()),
        (Dtype::I32, &[172, 8][..])
    );
    let scale = st
        .tensor("model.layers.0.mlp.gate_proj.weight_scale")
        .unwrap();
    assert_eq!((scale.dtype(), scale.shape()), (Dtype::F16, &[172, 2][..]));
    let shape = st
        .tensor("model.layers.0.mlp.gate_proj.weight_shape")
        .unwrap();
    assert_eq!(
        shape.data(),
        &[172i64, 64].map(i64::to_le_bytes).concat()[..]
    );
    assert!(st.tensor("model.layers.0.self_attn.q_proj.weight").is_ok());
    // tandem reads it back as Q4_0, exactly.
    let info = ok(&["info", s(&ct)]);
    assert!(
        info.contains("compressed-tensors, group_0: int4 symmetric group 32 (pack-quantized)"),
        "{info}"
    );
    assert!(info.contains("layers held as Q4_0 (exact)"), "{info}");
    // Back to GGUF losslessly: the same bytes as quantizing the 16-bit model straight to GGUF
    // with embeddings kept (what the export kept).
    let direct = tmp.path().join("direct.gguf");
    let via = tmp.path().join("via.gguf");
    ok(&[
        "quantize",
        s(&stories()),
        "--out",
        s(&direct),
        "--scheme",
        "q4_0",
        "--embeddings",
        "keep",
        "-q",
    ]);
    ok(&["quantize", s(&ct), "--out", s(&via), "-q"]);
    let a = tandem_model::Checkpoint::open(&direct, None).unwrap();
    let b = tandem_model::Checkpoint::open(&via, None).unwrap();
    let mut compared = 0;
    for n in a.store.names() {
        let (x, y) = (a.store.get(&n).unwrap(), b.store.get(&n).unwrap());
        assert_eq!(x.dtype, y.dtype, "{n}");
        assert!(x.data == y.data, "{n}: bytes differ");
        compared += 1;
    }
    assert_eq!(compared, b.store.names().len());
    // And the folder runs: the same greedy text as the GGUF made straight from the source.
    let gen = |m: &Path| {
        ok(&[
            "generate",
            "--model",
            s(m),
            "--prompt",
            "Once upon a time",
            "--max-tokens",
            "24",
        ])
    };
    assert_eq!(gen(&ct), gen(&direct));
}

#[test]
fn export_refuses_layouts_compressed_tensors_has_not() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("ct");
    let src = stories();
    let base = [
        "quantize",
        s(&src),
        "--out",
        s(&out),
        "--format",
        "compressed-tensors",
    ];
    fails(
        &[&base[..], &["--scheme", "q4_k"]].concat(),
        &["has no compressed-tensors layout (supported: q4_0"],
    );
    fails(
        &[&base[..], &["--scheme", "q4_0", "--embeddings", "q8_0"]].concat(),
        &["compressed-tensors quantizes only linear layers"],
    );
    assert!(!out.exists());
    assert_eq!(
        std::fs::read_dir(tmp.path()).unwrap().count(),
        0,
        "left something behind"
    );
}

#[test]
fn an_imatrix_of_another_width_is_refused_in_either_format() {
    // llama-imatrix's matrix for stories260K with one entry cut short, as a matrix made for
    // another model reads: both writers and GPTQ refuse it, naming the tensor, and leave
    // nothing.
    let tmp = tempfile::tempdir().unwrap();
    let fixture = root().join("tests/fixtures/llama-quantize/stories260K-imatrix.gguf");
    let mut m = tandem_quantize::ImportanceMatrix::read(&fixture).unwrap();
    let entry = m.entries.get_mut("blk.1.ffn_up.weight").unwrap();
    entry.sum2.truncate(entry.sum2.len() / 2);
    let imatrix = tmp.path().join("other.imatrix.gguf");
    m.write_gguf(&imatrix, false).unwrap();
    let src = stories();
    for (format, method, out) in [
        ("gguf", "rtn", "q.gguf"),
        ("compressed-tensors", "rtn", "ct"),
        // GPTQ weights its rounding by the imatrix too: refused at that layer, not after the
        // whole model's GPTQ.
        ("gguf", "gptq", "gptq.gguf"),
        ("compressed-tensors", "gptq", "gptq-ct"),
    ] {
        let out = tmp.path().join(out);
        fails(
            &[
                "quantize",
                s(&src),
                "--out",
                s(&out),
                "--format",
                format,
                "--scheme",
                "q4_0",
                "--method",
                method,
                "--imatrix",
                s(&imatrix),
            ],
            &[
                "blk.1.ffn_up.weight",
                "imatrix has 32 columns, the tensor 64",
            ],
        );
        assert!(!out.exists(), "{format} {method}: left {}", out.display());
    }
    assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 1);
}

/// Writes `config.json` of `dir` with `edit` applied to its quantization_config.
fn edit_config(dir: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let p = dir.join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    edit(&mut cfg);
    std::fs::write(&p, serde_json::to_string(&cfg).unwrap()).unwrap();
}

/// Rewrites the safetensors of `dir` with `edit` applied to its (name → (dtype, shape, bytes)).
fn edit_tensors(
    dir: &Path,
    edit: impl FnOnce(&mut std::collections::BTreeMap<String, (Dtype, Vec<usize>, Vec<u8>)>),
) {
    let p = dir.join("model.safetensors");
    let bytes = std::fs::read(&p).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut m: std::collections::BTreeMap<String, (Dtype, Vec<usize>, Vec<u8>)> = st
        .tensors()
        .into_iter()
        .map(|(n, v)| (n, (v.dtype(), v.shape().to_vec(), v.data().to_vec())))
        .collect();
    edit(&mut m);
    let views: Vec<(String, safetensors::tensor::TensorView)> = m
        .iter()
        .map(|(n, (d, sh, b))| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(*d, sh.clone(), b).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, &p).unwrap();
}

#[test]
fn bad_quantized_checkpoints_are_one_line_errors_naming_the_field_or_tensor() {
    let tmp = tempfile::tempdir().unwrap();
    let good = export(tmp.path());
    let case = |name: &str| -> PathBuf {
        let d = tmp.path().join(name);
        std::fs::create_dir(&d).unwrap();
        for f in std::fs::read_dir(&good).unwrap() {
            let f = f.unwrap().path();
            std::fs::copy(&f, d.join(f.file_name().unwrap())).unwrap();
        }
        d
    };
    let check = |d: &Path, needles: &[&str]| {
        for cmd in [
            vec!["info", s(d)],
            vec!["generate", "--model", s(d), "--prompt", "Hi"],
        ] {
            fails(&cmd, needles);
        }
        let out = tmp.path().join("never.gguf");
        fails(&["quantize", s(d), "--out", s(&out)], needles);
        assert!(!out.exists());
    };
    // Integer tensors without a quantization_config.
    let d = case("no-config");
    edit_config(&d, |c| {
        c.as_object_mut().unwrap().remove("quantization_config");
    });
    check(&d, &["weight_packed", "I32", "quantization_config"]);
    // Unsupported settings, named by field.
    let d = case("float-type");
    edit_config(&d, |c| {
        c["quantization_config"]["config_groups"]["group_0"]["weights"]["type"] = "float".into()
    });
    check(
        &d,
        &["config_groups.group_0.weights.type = 'float' is not supported"],
    );
    let d = case("block-strategy");
    edit_config(&d, |c| {
        c["quantization_config"]["config_groups"]["group_0"]["weights"]["strategy"] = "block".into()
    });
    check(&d, &["weights.strategy = 'block' is not supported"]);
    let d = case("sparse");
    edit_config(
        &d,
        |c| {
            c["quantization_config"]["sparsity_config"] =
                serde_json::json!({"format": "sparse-24-bitmask", "sparsity_structure": "2:4"})
        },
    );
    check(
        &d,
        &["sparsity_config (sparse compression) is not supported"],
    );
    let d = case("group-minus-one");
    edit_config(&d, |c| {
        c["quantization_config"]["config_groups"]["group_0"]["weights"]["group_size"] = (-1).into()
    });
    check(
        &d,
        &["config_groups.group_0.weights.group_size is -1 with strategy 'group'"],
    );
    let d = case("bits-9");
    edit_config(&d, |c| {
        c["quantization_config"]["config_groups"]["group_0"]["weights"]["num_bits"] = 9.into()
    });
    check(&d, &["num_bits = 9 is not supported"]);
    let d = case("method");
    edit_config(&d, |c| {
        c["quantization_config"]["quant_method"] = "bitsandbytes".into()
    });
    check(&d, &["quant_method 'bitsandbytes' is not supported"]);
    // Contradictions between the config and the tensors.
    let d = case("group-64");
    edit_config(&d, |c| {
        c["quantization_config"]["config_groups"]["group_0"]["weights"]["group_size"] = 64.into()
    });
    check(&d, &["weight_scale", "does not match the layer"]);
    let d = case("bits-8");
    edit_config(&d, |c| {
        c["quantization_config"]["config_groups"]["group_0"]["weights"]["num_bits"] = 8.into()
    });
    check(
        &d,
        &["model.layers.0.mlp.gate_proj.weight_packed", "at 8 bits"],
    );
    let d = case("asymmetric-without-zeros");
    edit_config(&d, |c| {
        c["quantization_config"]["config_groups"]["group_0"]["weights"]["symmetric"] = false.into()
    });
    check(&d, &["weight_scale", "no weight_zero_point"]);
    // Tensors that lie.
    let d = case("shape-lies");
    edit_tensors(&d, |m| {
        m.get_mut("model.layers.1.mlp.up_proj.weight_shape")
            .unwrap()
            .2 = [172i64 * 1_000_000_000, 64].map(i64::to_le_bytes).concat();
    });
    check(
        &d,
        &[
            "model.layers.1.mlp.up_proj.weight_shape",
            "not a plausible [out, in] shape",
        ],
    );
    let d = case("g-idx-out-of-range");
    edit_tensors(&d, |m| {
        let g: Vec<u8> = (0..64i32)
            .map(|c| if c == 40 { 7 } else { c / 32 })
            .flat_map(i32::to_le_bytes)
            .collect();
        m.insert(
            "model.layers.2.mlp.gate_proj.weight_g_idx".into(),
            (Dtype::I32, vec![64], g),
        );
    });
    check(
        &d,
        &[
            "model.layers.2.mlp.gate_proj.weight_g_idx",
            "column 40 names group 7, outside 0..2",
        ],
    );
    let d = case("missing-scale");
    edit_tensors(&d, |m| {
        m.remove("model.layers.3.mlp.up_proj.weight_scale");
    });
    check(&d, &["model.layers.3.mlp.up_proj.weight_scale", "missing"]);
    let d = case("stray-integers");
    edit_tensors(&d, |m| {
        m.insert(
            "model.extra.counts".into(),
            (Dtype::I64, vec![1], 5i64.to_le_bytes().to_vec()),
        );
    });
    check(&d, &["model.extra.counts", "no quantized layer uses"]);
}

#[test]
fn act_order_groups_that_keep_blocks_together_stay_q4_0_and_others_are_dequantized_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let good = export(tmp.path());
    // g_idx listing each column's group in order: the same layer, still Q4_0.
    let in_order = |m: &mut std::collections::BTreeMap<String, (Dtype, Vec<usize>, Vec<u8>)>,
                    swap: bool| {
        let mut g: Vec<i32> = (0..64).map(|c| c / 32).collect();
        if swap {
            g.swap(3, 40);
        }
        m.insert(
            "model.layers.2.mlp.gate_proj.weight_g_idx".into(),
            (
                Dtype::I32,
                vec![64],
                g.iter().flat_map(|x| x.to_le_bytes()).collect(),
            ),
        );
    };
    edit_tensors(&good, |m| in_order(m, false));
    let info = ok(&["info", s(&good)]);
    assert!(info.contains("10 layers held as Q4_0 (exact)"), "{info}");
    // Columns 3 and 40 swapped between groups: no Q4_0 block holds that layer, so F32.
    edit_tensors(&good, |m| in_order(m, true));
    let info = ok(&["info", s(&good)]);
    assert!(info.contains("9 layers held as Q4_0 (exact)"), "{info}");
    assert!(info.contains("1 layers held as F32 (dequantized: groups (act-order) do not keep 32-column blocks together)"), "{info}");
    let gguf = tmp.path().join("m.gguf");
    let plan = ok(&["quantize", s(&good), "--out", s(&gguf), "--scheme", "q4_0"]);
    assert!(
        plan.contains("dequantized"),
        "the plan should say which tensor lost exactness: {plan}"
    );
}

#[test]
fn asymmetric_export_has_integer_zero_points_and_reads_back_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let ct = tmp.path().join("asym");
    ok(&[
        "quantize",
        s(&stories()),
        "--out",
        s(&ct),
        "--format",
        "compressed-tensors",
        "--scheme",
        "q4_1",
        "-q",
    ]);
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(ct.join("config.json")).unwrap()).unwrap();
    assert_eq!(
        cfg["quantization_config"]["config_groups"]["group_0"]["weights"]["symmetric"],
        false
    );
    let bytes = std::fs::read(ct.join("model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    // Zero points packed along the output dimension: 172 rows → 22 words, 2 groups.
    let zp = st
        .tensor("model.layers.0.mlp.gate_proj.weight_zero_point")
        .unwrap();
    assert_eq!((zp.dtype(), zp.shape()), (Dtype::I32, &[22, 2][..]));
    let info = ok(&["info", s(&ct)]);
    assert!(
        info.contains("int4 asymmetric group 32 (pack-quantized)"),
        "{info}"
    );
    // (q − z)·s held exactly: as Q8_0 (levels q − z), or Q4_1 where the offsets are f16s.
    assert!(info.contains("layers held as Q8_0 (exact)"), "{info}");
    // Lossless to GGUF (the blocks copied); asked for q4_1, the plan says it is not exact.
    let gguf = tmp.path().join("m.gguf");
    ok(&["quantize", s(&ct), "--out", s(&gguf), "-q"]);
    let plan = ok(&[
        "quantize",
        s(&ct),
        "--out",
        s(&tmp.path().join("q41.gguf")),
        "--scheme",
        "q4_1",
    ]);
    assert!(
        plan.contains("requantized from the source grid to q4_1: not exact"),
        "{plan}"
    );
    let gen = |m: &Path| {
        ok(&[
            "generate",
            "--model",
            s(m),
            "--prompt",
            "Once upon a time",
            "--max-tokens",
            "16",
        ])
    };
    assert_eq!(gen(&ct), gen(&gguf));
    // Calibrated methods make float minima compressed-tensors cannot hold: refused.
    // (q4_0 with them is fine, and the folder says how it was made: see below.)
    fails(
        &[
            "quantize",
            s(&stories()),
            "--out",
            s(&tmp.path().join("no")),
            "--format",
            "compressed-tensors",
            "--scheme",
            "q4_1",
            "--method",
            "gptq",
        ],
        &["float minimum", "--method rtn"],
    );
    assert!(!tmp.path().join("no").exists());
}

#[test]
fn group_size_shares_one_scale_per_group_and_is_checked() {
    let tmp = tempfile::tempdir().unwrap();
    let ct = tmp.path().join("g64");
    let src = stories();
    ok(&[
        "quantize",
        s(&src),
        "--out",
        s(&ct),
        "--format",
        "compressed-tensors",
        "--scheme",
        "q8_0",
        "--group-size",
        "64",
        "-q",
    ]);
    let bytes = std::fs::read(ct.join("model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let scale = st
        .tensor("model.layers.0.mlp.up_proj.weight_scale")
        .unwrap();
    assert_eq!(scale.shape(), &[172, 1]);
    let info = ok(&["info", s(&ct)]);
    assert!(
        info.contains("int8 symmetric group 64 (pack-quantized)"),
        "{info}"
    );
    assert!(info.contains("layers held as Q8_0 (exact)"), "{info}");
    let gguf = tmp.path().join("m.gguf");
    ok(&["quantize", s(&ct), "--out", s(&gguf), "-q"]);
    let gen = |m: &Path| {
        ok(&[
            "generate",
            "--model",
            s(m),
            "--prompt",
            "Once upon a time",
            "--max-tokens",
            "16",
        ])
    };
    assert_eq!(gen(&ct), gen(&gguf));
    let out = tmp.path().join("no");
    let base = ["quantize", s(&src), "--out", s(&out), "--scheme", "q4_0"];
    fails(
        &[
            &base[..],
            &["--format", "compressed-tensors", "--group-size", "48"],
        ]
        .concat(),
        &["--group-size 48 is not a multiple of 32"],
    );
    fails(
        &[
            &base[..],
            &["--format", "compressed-tensors", "--group-size", "128"],
        ]
        .concat(),
        &["64 columns are not a multiple of --group-size 128"],
    );
    fails(
        &[
            &base[..],
            &[
                "--format",
                "compressed-tensors",
                "--group-size",
                "64",
                "--method",
                "gptq",
            ],
        ]
        .concat(),
        &["--group-size 64 takes --method rtn"],
    );
    fails(
        &[&base[..], &["--group-size", "64"]].concat(),
        &["--group-size applies to --format compressed-tensors"],
    );
    assert!(!out.exists());
}

#[test]
fn a_calibrated_export_says_how_it_was_made() {
    let tmp = tempfile::tempdir().unwrap();
    let ct = tmp.path().join("gptq");
    ok(&[
        "quantize",
        s(&stories()),
        "--out",
        s(&ct),
        "--format",
        "compressed-tensors",
        "--scheme",
        "q4_0",
        "--method",
        "gptq",
        "--calib-chunks",
        "4",
        "-q",
    ]);
    let info = ok(&["info", s(&ct)]);
    assert!(info.contains("quantized with: method=gptq"), "{info}");
    assert!(info.contains("calibration.sha256="), "{info}");
}
