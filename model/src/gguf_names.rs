//! llama.cpp's GGUF conventions: tensor names and the Q/K row permutation.
//!
//! tandem's forward pass works in Hugging Face names and the Hugging Face "rotate half" RoPE
//! layout. A GGUF written by llama.cpp (or by `tandem quantize`) stores q/k rows permuted for
//! RoPE on adjacent pairs; loading undoes that, writing applies it.

/// Maps a Hugging Face tensor name to its GGUF name.
pub fn hf_to_gguf(hf: &str) -> Option<String> {
    match hf {
        "model.embed_tokens.weight" => return Some("token_embd.weight".into()),
        "model.norm.weight" => return Some("output_norm.weight".into()),
        "lm_head.weight" => return Some("output.weight".into()),
        _ => {}
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, suffix) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (module, kind) = suffix.rsplit_once('.')?;
    let g = LAYER_NAMES.iter().find(|(h, _)| *h == module)?.1;
    Some(format!("blk.{layer}.{g}.{kind}"))
}

/// Maps a GGUF tensor name back to its Hugging Face name.
pub fn gguf_to_hf(g: &str) -> Option<String> {
    match g {
        "token_embd.weight" => return Some("model.embed_tokens.weight".into()),
        "output_norm.weight" => return Some("model.norm.weight".into()),
        "output.weight" => return Some("lm_head.weight".into()),
        _ => {}
    }
    let rest = g.strip_prefix("blk.")?;
    let (layer, suffix) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (module, kind) = suffix.rsplit_once('.')?;
    let h = LAYER_NAMES.iter().find(|(_, gg)| *gg == module)?.0;
    Some(format!("model.layers.{layer}.{h}.{kind}"))
}

const LAYER_NAMES: &[(&str, &str)] = &[
    ("input_layernorm", "attn_norm"),
    ("self_attn.q_proj", "attn_q"),
    ("self_attn.k_proj", "attn_k"),
    ("self_attn.v_proj", "attn_v"),
    ("self_attn.o_proj", "attn_output"),
    ("post_attention_layernorm", "ffn_norm"),
    ("mlp.gate_proj", "ffn_gate"),
    ("mlp.up_proj", "ffn_up"),
    ("mlp.down_proj", "ffn_down"),
];

/// Which direction to move q/k rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Permute {
    /// Hugging Face rotate-half layout → llama.cpp adjacent-pair layout (writing GGUF).
    HfToGguf,
    /// llama.cpp adjacent-pair layout → Hugging Face rotate-half layout (reading GGUF).
    GgufToHf,
}

/// Reorders whole rows of a q or k projection (`n_rows = n_head * head_dim`, each row
/// `row_bytes` long, any element type including quantized blocks). Within a head, HF row
/// `s * head_dim/2 + i` corresponds to GGUF row `2 * i + s`.
pub fn permute_qk_rows(
    data: &[u8],
    n_head: usize,
    n_rows: usize,
    row_bytes: usize,
    dir: Permute,
) -> Vec<u8> {
    let mut out = vec![0u8; data.len()];
    let head_dim = n_rows / n_head;
    let half = head_dim / 2;
    for h in 0..n_head {
        for s in 0..2 {
            for i in 0..half {
                let hf = h * head_dim + s * half + i;
                let gg = h * head_dim + 2 * i + s;
                let (src, dst) = match dir {
                    Permute::HfToGguf => (hf, gg),
                    Permute::GgufToHf => (gg, hf),
                };
                out[dst * row_bytes..(dst + 1) * row_bytes]
                    .copy_from_slice(&data[src * row_bytes..(src + 1) * row_bytes]);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for n in [
            "model.embed_tokens.weight",
            "model.norm.weight",
            "lm_head.weight",
            "model.layers.0.self_attn.q_proj.weight",
            "model.layers.12.self_attn.k_proj.bias",
            "model.layers.29.mlp.down_proj.weight",
            "model.layers.3.post_attention_layernorm.weight",
        ] {
            let g = hf_to_gguf(n).unwrap();
            assert_eq!(gguf_to_hf(&g).as_deref(), Some(n), "{g}");
        }
        assert_eq!(
            hf_to_gguf("model.layers.4.self_attn.o_proj.weight").as_deref(),
            Some("blk.4.attn_output.weight")
        );
        assert_eq!(hf_to_gguf("model.layers.x.mlp.up_proj.weight"), None);
        assert_eq!(gguf_to_hf("rope_freqs.weight"), None);
    }

    #[test]
    fn permutation_matches_llama_cpp_and_inverts() {
        // 2 heads of head_dim 4, one byte per row: HF rows [0..8) -> GGUF order.
        let hf: Vec<u8> = (0..8).collect();
        let g = permute_qk_rows(&hf, 2, 8, 1, Permute::HfToGguf);
        // reshape(n_head, 2, hd/2).swapaxes(1, 2): head 0 rows [0,2,1,3], head 1 [4,6,5,7]
        assert_eq!(g, vec![0, 2, 1, 3, 4, 6, 5, 7]);
        assert_eq!(permute_qk_rows(&g, 2, 8, 1, Permute::GgufToHf), hf);
    }
}
