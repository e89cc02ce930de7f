//! Writing a checkpoint out as a Hugging Face folder with F16 safetensors (`tandem convert`).
//!
//! Tensors are converted and written one at a time, so memory stays at one tensor whatever the
//! model size. The folder is assembled under a temporary name beside the target and renamed
//! into place at the end: a failure leaves nothing half-written, and an existing folder is
//! replaced only with `force`.

use crate::checkpoint::Checkpoint;
use crate::config::Architecture;
use crate::error::{format_err, io_err, tensor_err, Error, Result};
use crate::gguf_names::{permute_qk_rows, Permute};
use crate::linear::dense_tensor;
use crate::pending::Pending;
use candle_core::{DType, Device};
use serde_json::json;
use std::io::Write;
use std::path::{Path, PathBuf};

/// Progress callback: (bytes done, bytes total, current tensor).
pub type Progress<'a> = &'a mut dyn FnMut(u64, u64, &str);

pub fn export_hf_f16(
    ck: &Checkpoint,
    out: &Path,
    force: bool,
    progress: Progress<'_>,
) -> Result<()> {
    if ck.config.rope_freq_factors.is_some() {
        return Err(Error::Unsupported {
            path: ck.path.clone(),
            msg: "rope_freqs (llama3 rope scaling stored as a tensor) cannot be expressed in config.json yet".into(),
        });
    }
    write_dir_atomically(out, force, |tmp| {
        write_config(ck, &tmp.join("config.json"))?;
        std::fs::write(tmp.join("tokenizer.json"), &ck.tokenizer.json)
            .map_err(|e| io_err(&tmp.join("tokenizer.json"), e))?;
        let mut tc = json!({
            "add_bos_token": ck.tokenizer.add_bos,
            "bos_token": ck.tokenizer.bos_id.and_then(|i| ck.tokenizer.id_to_token(i)),
            "eos_token": ck.tokenizer.eos_ids.first().and_then(|&i| ck.tokenizer.id_to_token(i)),
        });
        if let Some(t) = &ck.tokenizer.chat_template {
            tc["chat_template"] = json!(t);
        }
        write_json(&tmp.join("tokenizer_config.json"), &tc)?;
        write_safetensors_f16(ck, &tmp.join("model.safetensors"), progress)
    })
}

fn write_json(path: &Path, v: &serde_json::Value) -> Result<()> {
    let text = serde_json::to_string_pretty(v).map_err(|e| format_err(path, e.to_string()))?;
    std::fs::write(path, text).map_err(|e| io_err(path, e))
}

fn write_config(ck: &Checkpoint, path: &Path) -> Result<()> {
    let c = &ck.config;
    let arch_class = match c.architecture() {
        Architecture::Llama => "LlamaForCausalLM",
        Architecture::Qwen2 => "Qwen2ForCausalLM",
    };
    let mut v = json!({
        "architectures": [arch_class],
        "model_type": c.model_type,
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_hidden_layers,
        "num_attention_heads": c.num_attention_heads,
        "num_key_value_heads": c.num_kv_heads(),
        "head_dim": c.head_dim(),
        "vocab_size": c.vocab_size,
        "max_position_embeddings": c.max_position_embeddings,
        "rms_norm_eps": c.rms_norm_eps,
        "rope_theta": c.rope_theta,
        "tie_word_embeddings": c.tie_word_embeddings,
        "bos_token_id": c.bos_token_id,
        "eos_token_id": c.eos_ids().first(),
        "attention_bias": c.qkv_bias(),
        "hidden_act": "silu",
        "torch_dtype": "float16",
    });
    if let Some(s) = &c.rope_scaling {
        v["rope_scaling"] = json!({"rope_type": s.rope_type, "factor": s.factor,
            "low_freq_factor": s.low_freq_factor, "high_freq_factor": s.high_freq_factor,
            "original_max_position_embeddings": s.original_max_position_embeddings});
    }
    write_json(path, &v)
}

/// Streams every tensor to `path` as F16 safetensors. Written by hand rather than with
/// `safetensors::serialize_to_file` because that API takes infallible views: converting a
/// tensor lazily could then not report an error, and converting eagerly would hold the whole
/// model in memory.
fn write_safetensors_f16(ck: &Checkpoint, path: &Path, progress: Progress<'_>) -> Result<()> {
    let store = &ck.store;
    let permute = store.is_gguf() && ck.config.architecture() == Architecture::Llama;
    let names: Vec<String> = store
        .names()
        .into_iter()
        .filter(|n| n.starts_with("model.") || n == "lm_head.weight")
        .collect();
    let mut header = serde_json::Map::new();
    header.insert("__metadata__".into(), json!({"format": "pt"}));
    let mut offset = 0usize;
    for n in &names {
        let raw = store.get(n)?;
        let bytes = raw.elem_count() * 2;
        header.insert(
            n.clone(),
            json!({"dtype": "F16", "shape": raw.shape, "data_offsets": [offset, offset + bytes]}),
        );
        offset += bytes;
    }
    let mut head = serde_json::to_vec(&header).map_err(|e| format_err(path, e.to_string()))?;
    head.resize(head.len().next_multiple_of(8), b' ');
    let file = std::fs::File::create(path).map_err(|e| io_err(path, e))?;
    let mut w = std::io::BufWriter::new(file);
    let werr = |e: std::io::Error| io_err(path, format!("write failed: {e}"));
    w.write_all(&(head.len() as u64).to_le_bytes())
        .map_err(werr)?;
    w.write_all(&head).map_err(werr)?;
    let total = offset as u64;
    let mut done = 0u64;
    let nh = ck.config.num_attention_heads;
    let nkv = ck.config.num_kv_heads();
    for n in &names {
        progress(done, total, n);
        let raw = store.get(n)?;
        let src = store.path_of(n);
        let t = dense_tensor(src, &raw, &Device::Cpu)?.to_dtype(DType::F32)?;
        let vals: Vec<f32> = t.flatten_all()?.to_vec1()?;
        if let Some(i) = vals.iter().position(|v| !v.is_finite()) {
            return Err(tensor_err(
                src,
                &store.stored_name(n),
                format!("non-finite value at element {i}"),
            ));
        }
        let mut bytes: Vec<u8> = vals
            .iter()
            .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
            .collect();
        let heads = if n.ends_with("self_attn.q_proj.weight")
            || n.ends_with("self_attn.q_proj.bias")
        {
            Some(nh)
        } else if n.ends_with("self_attn.k_proj.weight") || n.ends_with("self_attn.k_proj.bias") {
            Some(nkv)
        } else {
            None
        };
        if let (true, Some(h)) = (permute, heads) {
            let rows = raw.shape[0];
            bytes = permute_qk_rows(&bytes, h, rows, bytes.len() / rows, Permute::GgufToHf);
        }
        w.write_all(&bytes).map_err(werr)?;
        done += bytes.len() as u64;
    }
    progress(total, total, "");
    w.flush().map_err(werr)?;
    w.into_inner()
        .map_err(|e| io_err(path, e.error()))?
        .sync_all()
        .map_err(|e| io_err(path, e))?;
    Ok(())
}

/// Refuses `out` as an output when it is a device, pipe or socket. Outputs replace what is
/// there by renaming a new file into place, which would leave a regular file where the device
/// was: `quantize --out /dev/null --force`, run as root, replaced /dev/null. A symlink is
/// replaced itself, never what it points to.
pub fn check_replaceable(out: &Path) -> Result<()> {
    match std::fs::symlink_metadata(out) {
        Ok(m) if !(m.is_file() || m.is_dir() || m.file_type().is_symlink()) => Err(format_err(
            out,
            "is not a regular file or folder (a device, pipe or socket): tandem writes an output by renaming a new file into place, so it will not replace this",
        )),
        _ => Ok(()),
    }
}

/// Builds a directory under a temporary name beside `out`, then renames it into place.
/// Refuses to replace an existing `out` unless `force`; removes the temporary on failure.
pub fn write_dir_atomically<E: From<Error>>(
    out: &Path,
    force: bool,
    build: impl FnOnce(&Path) -> std::result::Result<(), E>,
) -> std::result::Result<(), E> {
    check_replaceable(out)?;
    if out.exists() && !force {
        return Err(format_err(out, "already exists (pass --force to overwrite)").into());
    }
    let tmp = sibling_temp(out);
    // Removed on any error (the guard drops) or signal (the CLI's handler).
    let ((), guard) =
        Pending::create(&tmp, |p| std::fs::create_dir_all(p)).map_err(|e| io_err(&tmp, e))?;
    build(&tmp)?;
    let done: Result<()> = guard.commit(|| {
        if out.exists() {
            let old = sibling_temp(out);
            std::fs::rename(out, &old).map_err(|e| io_err(out, e))?;
            std::fs::rename(&tmp, out).map_err(|e| io_err(out, e))?;
            let _ = std::fs::remove_dir_all(&old).or_else(|_| std::fs::remove_file(&old));
            Ok(())
        } else {
            std::fs::rename(&tmp, out).map_err(|e| io_err(out, e))
        }
    });
    Ok(done?)
}

/// A hidden name in the same folder as `out` (so the final rename stays on one filesystem).
pub fn sibling_temp(out: &Path) -> PathBuf {
    let name = out
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "out".into());
    let parent = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    parent.join(format!(".{name}.tmp-{}-{stamp}", std::process::id()))
}

/// Writes a file under a temporary name beside `out` (same folder, so the rename is atomic),
/// syncs it and renames it into place. An existing `out` is refused unless `force`; on any
/// failure, or if the process dies first, the temporary is removed (the tempfile guard) and
/// `out` is untouched. The finished file gets the usual permissions (umask applies), not a
/// temporary file's owner-only ones.
pub fn write_file_atomically<E: From<Error>>(
    out: &Path,
    force: bool,
    build: impl FnOnce(&mut std::io::BufWriter<tempfile::NamedTempFile>) -> std::result::Result<(), E>,
) -> std::result::Result<(), E> {
    check_replaceable(out)?;
    if out.exists() && !force {
        return Err(format_err(out, "already exists (pass --force to overwrite)").into());
    }
    if out.is_dir() {
        return Err(format_err(out, "is a directory").into());
    }
    let dir = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = out
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "out".into());
    let prefix = format!(".{name}.");
    let mut builder = tempfile::Builder::new();
    builder.prefix(&prefix).suffix(".tmp");
    // tempfile removes it on drop; the guard also removes it on a signal (no drop runs then).
    let (tmp, guard) = Pending::temp_file_in(&builder, dir).map_err(|e| io_err(dir, e))?;
    let mut w = std::io::BufWriter::with_capacity(8 << 20, tmp);
    build(&mut w)?;
    let tmp = w.into_inner().map_err(|e| io_err(out, e.into_error()))?;
    tmp.as_file().sync_all().map_err(|e| io_err(out, e))?;
    let persisted = guard.commit(|| {
        if force {
            tmp.persist(out)
        } else {
            tmp.persist_noclobber(out)
        }
    });
    persisted.map_err(|e| io_err(out, e.error))?;
    Ok(())
}
