//! `tandem info` and `tandem convert`.

use crate::args::progress_bar;
use anyhow::{Context, Result};
use std::collections::BTreeMap;
use std::path::Path;
use tandem_model::Checkpoint;

pub fn info(path: &Path, tokenizer: Option<&Path>, verbose: bool) -> Result<()> {
    let ck = Checkpoint::open(path, tokenizer)?;
    let c = &ck.config;
    let store = &ck.store;
    let mut by_type: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    for n in store.names() {
        let t = store.get(&n)?;
        let e = by_type.entry(t.dtype.name()).or_default();
        e.0 += t.elem_count();
        e.1 += t.data.len();
        if verbose {
            println!(
                "  {:<48} {:<6} {:?}",
                store.stored_name(&n),
                t.dtype.name(),
                t.shape
            );
        }
    }
    let params = ck.parameter_count();
    let bytes = store.data_bytes();
    println!("model:         {}", ck.path.display());
    println!(
        "format:        {}",
        if store.is_gguf() {
            "GGUF"
        } else {
            "safetensors"
        }
    );
    println!("architecture:  {} ({:?})", c.model_type, c.architecture());
    println!("parameters:    {params} ({:.1} M)", params as f64 / 1e6);
    println!(
        "size:          {bytes} bytes ({:.1} MiB, {:.2} bits/weight)",
        bytes as f64 / 1048576.0,
        bytes as f64 * 8.0 / params.max(1) as f64
    );
    println!("layers:        {}", c.num_hidden_layers);
    println!(
        "hidden:        {} (intermediate {})",
        c.hidden_size, c.intermediate_size
    );
    println!(
        "heads:         {} query / {} key-value, head_dim {}",
        c.num_attention_heads,
        c.num_kv_heads(),
        c.head_dim()
    );
    println!("context:       {}", c.context_length());
    println!(
        "vocabulary:    {} (tokenizer: {} tokens, BOS {} , EOS {:?})",
        c.vocab_size,
        ck.tokenizer.vocab_size(),
        match (ck.tokenizer.add_bos, ck.tokenizer.bos_id) {
            (true, Some(b)) => format!("{b} added"),
            (false, Some(b)) => format!("{b} not added"),
            _ => "none".into(),
        },
        ck.tokenizer.eos_ids
    );
    println!(
        "rope:          theta {}{}",
        c.rope_theta,
        c.rope_scaling
            .as_ref()
            .map(|s| format!(", {} scaling x{}", s.rope_type, s.factor.unwrap_or(1.0)))
            .unwrap_or_default()
    );
    println!("tied embeddings: {}", c.tie_word_embeddings);
    if let Some(imp) = &ck.imported {
        println!("quantized as:  {}", imp.config.describe());
        for (held, n) in imp.counts() {
            println!("  {n} layers held as {held}");
        }
        for note in &imp.config.notes {
            println!("  note: {note}");
        }
    }
    let record = ck.quantization_record();
    if !record.is_empty() {
        let parts: Vec<String> = record.iter().map(|(k, v)| format!("{k}={v}")).collect();
        println!("quantized with: {}", parts.join(", "));
    }
    println!("tensor types:");
    for (t, (elems, b)) in by_type {
        println!("  {t:<6} {elems:>12} weights {b:>12} bytes");
    }
    Ok(())
}

pub fn convert(
    input: &Path,
    out: &Path,
    force: bool,
    tokenizer: Option<&Path>,
    quiet: bool,
) -> Result<()> {
    let ck = Checkpoint::open(input, tokenizer)?;
    if !ck.store.is_gguf() {
        anyhow::bail!(
            "{}: convert reads GGUF files; this is already a Hugging Face folder",
            input.display()
        );
    }
    let bar = progress_bar(quiet);
    let start = std::time::Instant::now();
    let mut cb = |done: u64, total: u64, name: &str| {
        bar.set_length(total);
        bar.set_position(done);
        bar.set_message(name.to_string());
    };
    tandem_model::export::export_hf_f16(&ck, out, force, &mut cb)
        .with_context(|| format!("converting {}", input.display()))?;
    bar.finish_and_clear();
    eprintln!(
        "wrote {} ({} parameters as F16) in {:.1} s",
        out.display(),
        ck.parameter_count(),
        start.elapsed().as_secs_f64()
    );
    Ok(())
}
