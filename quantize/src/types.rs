//! The storage types a tensor can be written as, with their GGML ids and block geometry, and
//! the fallback llama.cpp applies when a row does not fill whole blocks.

use candle_core::quantized::GgmlDType;
use std::fmt;
use tandem_kernels::GgmlType;

/// A target type for one tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum QuantType {
    F32,
    F16,
    BF16,
    Q8_0,
    Q5_0,
    Q5_1,
    Q4_0,
    Q4_1,
    Q6K,
    Q5K,
    Q4K,
    Q3K,
    Q2K,
}

pub const ALL_TYPES: &[QuantType] = &[
    QuantType::F32,
    QuantType::F16,
    QuantType::BF16,
    QuantType::Q8_0,
    QuantType::Q5_0,
    QuantType::Q5_1,
    QuantType::Q4_0,
    QuantType::Q4_1,
    QuantType::Q6K,
    QuantType::Q5K,
    QuantType::Q4K,
    QuantType::Q3K,
    QuantType::Q2K,
];

impl QuantType {
    /// The GGML type written: its name, GGUF id and block geometry come from
    /// `tandem_kernels::ggml`, the one table of formats.
    pub const fn format(self) -> GgmlType {
        match self {
            QuantType::F32 => GgmlType::F32,
            QuantType::F16 => GgmlType::F16,
            QuantType::BF16 => GgmlType::BF16,
            QuantType::Q8_0 => GgmlType::Q8_0,
            QuantType::Q5_0 => GgmlType::Q5_0,
            QuantType::Q5_1 => GgmlType::Q5_1,
            QuantType::Q4_0 => GgmlType::Q4_0,
            QuantType::Q4_1 => GgmlType::Q4_1,
            QuantType::Q6K => GgmlType::Q6K,
            QuantType::Q5K => GgmlType::Q5K,
            QuantType::Q4K => GgmlType::Q4K,
            QuantType::Q3K => GgmlType::Q3K,
            QuantType::Q2K => GgmlType::Q2K,
        }
    }

    /// The lower-case name users type (`q4_k`), as llama.cpp spells its types.
    pub fn name(self) -> &'static str {
        self.format().name()
    }

    pub fn parse(s: &str) -> Option<Self> {
        let s = s.trim().to_ascii_lowercase();
        ALL_TYPES.iter().copied().find(|t| t.name() == s)
    }

    /// candle's name for the type (to build its tensors).
    pub fn ggml(self) -> GgmlDType {
        tandem_model::gguf_reader::candle_dtype(self.format())
    }

    /// The type id stored in a GGUF tensor info (ggml's `enum ggml_type`).
    pub fn ggml_id(self) -> u32 {
        self.format().gguf_id()
    }

    pub fn block_size(self) -> usize {
        self.format().block_elems()
    }

    /// Bytes per block.
    pub fn type_size(self) -> usize {
        self.format().block_bytes()
    }

    pub fn is_dense(self) -> bool {
        self.format().is_dense()
    }

    /// Whether importance weights (an imatrix) change how this type is quantized: every block
    /// type but Q8_0, as in llama-quantize.
    pub fn uses_importance(self) -> bool {
        !self.is_dense() && self != QuantType::Q8_0
    }

    pub fn bits_per_weight(self) -> f64 {
        self.format().bits_per_weight()
    }

    /// Bytes for a tensor of `rows` rows of `cols` elements, or None when `cols` does not fill
    /// whole blocks.
    pub fn bytes_for(self, rows: usize, cols: usize) -> Option<usize> {
        if !cols.is_multiple_of(self.block_size()) {
            return None;
        }
        Some(rows * cols / self.block_size() * self.type_size())
    }

    /// The type a row of `cols` elements falls back to when it does not fill whole blocks of
    /// `self`: llama.cpp's table (256-wide K-quants to a 32-wide type of similar size), then
    /// F16 when even that does not fit. Returns `self` when it fits.
    pub fn fitting(self, cols: usize) -> QuantType {
        if cols.is_multiple_of(self.block_size()) {
            return self;
        }
        let next = match self {
            QuantType::Q2K | QuantType::Q3K => QuantType::Q4_0,
            QuantType::Q4K => QuantType::Q5_0,
            QuantType::Q5K => QuantType::Q5_1,
            QuantType::Q6K => QuantType::Q8_0,
            _ => QuantType::F16,
        };
        if cols.is_multiple_of(next.block_size()) {
            next
        } else {
            QuantType::F16
        }
    }
}

impl fmt::Display for QuantType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The names accepted on the command line, for error messages.
pub fn type_names() -> String {
    ALL_TYPES
        .iter()
        .map(|t| t.name())
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {

    #[test]
    fn gguf_type_ids_are_ggmls() {
        let ids: Vec<(&str, u32)> = ALL_TYPES.iter().map(|t| (t.name(), t.ggml_id())).collect();
        for (name, id) in [
            ("f32", 0),
            ("f16", 1),
            ("q4_0", 2),
            ("q4_1", 3),
            ("q5_0", 6),
            ("q5_1", 7),
            ("q8_0", 8),
            ("q2_k", 10),
            ("q3_k", 11),
            ("q4_k", 12),
            ("q5_k", 13),
            ("q6_k", 14),
            ("bf16", 30),
        ] {
            assert!(ids.contains(&(name, id)), "{name} should be {id}: {ids:?}");
        }
    }
    use super::*;

    #[test]
    fn names_round_trip_and_sizes_match_ggml() {
        for &t in ALL_TYPES {
            assert_eq!(QuantType::parse(t.name()), Some(t));
            assert_eq!(QuantType::parse(&t.name().to_uppercase()), Some(t));
        }
        assert_eq!(QuantType::parse("q4_k_m"), None);
        assert_eq!(QuantType::Q8_0.bytes_for(2, 64), Some(2 * 2 * 34));
        assert_eq!(QuantType::Q4_0.bits_per_weight(), 4.5);
        assert_eq!(QuantType::Q4K.bits_per_weight(), 4.5);
        assert_eq!(QuantType::Q6K.bits_per_weight(), 6.5625);
    }

    #[test]
    fn fallback_follows_llama_cpp() {
        // SmolLM2's 576 is a multiple of 32, not of 256.
        assert_eq!(QuantType::Q4K.fitting(576), QuantType::Q5_0);
        assert_eq!(QuantType::Q6K.fitting(576), QuantType::Q8_0);
        assert_eq!(QuantType::Q2K.fitting(576), QuantType::Q4_0);
        assert_eq!(QuantType::Q4K.fitting(1536), QuantType::Q4K);
        // stories260K's 172 fits no block type.
        assert_eq!(QuantType::Q4_0.fitting(172), QuantType::F16);
        assert_eq!(QuantType::Q4K.fitting(172), QuantType::F16);
        assert_eq!(QuantType::F32.fitting(172), QuantType::F32);
    }
}
