//! `SpeculativeDecoder`: tandem's own speculative loop over a `Model` and a `Drafter`.

use crate::drafter::Drafter;
use crate::model::{Model, Prompt};
use crate::{err, sampling};
use pyo3::prelude::*;
use pyo3::types::PyDict;
use tandem_speculate::session::SpecConfig;
use tandem_speculate::SpecStats;

/// tandem's speculative loop over a `Model` and a `Drafter`: `generate` returns the text,
/// `stats` the last run's metrics (drafted, accepted, tokens per verifier pass, times).
#[pyclass(module = "tandem")]
pub(crate) struct SpeculativeDecoder {
    model: Py<Model>,
    drafter: Py<Drafter>,
    config: SpecConfig,
    last: Option<SpecStats>,
}

#[pymethods]
impl SpeculativeDecoder {
    /// `draft_max`: most tokens drafted per verifier pass; `adapt`: let that follow what
    /// drafting earns; `draft_p_min`: a model draft stops below this top probability.
    #[new]
    #[pyo3(signature = (model, drafter, draft_max=8, adapt=true, draft_p_min=0.0))]
    fn new(
        model: Py<Model>,
        drafter: Py<Drafter>,
        draft_max: usize,
        adapt: bool,
        draft_p_min: f32,
    ) -> PyResult<Self> {
        tandem_speculate::check_draft_max(draft_max).map_err(err)?;
        if !(0.0..=1.0).contains(&draft_p_min) {
            return Err(err(format!("draft_p_min {draft_p_min} is outside 0..=1")));
        }
        Ok(SpeculativeDecoder {
            model,
            drafter,
            config: SpecConfig {
                draft_max,
                adapt,
                draft_p_min,
                ..SpecConfig::default()
            },
            last: None,
        })
    }

    /// Continues `prompt` speculatively (greedy output identical to `Model.generate`).
    #[pyo3(signature = (prompt, max_tokens=128, temperature=0.0, top_k=0, top_p=1.0, seed=0, add_bos=None))]
    #[allow(clippy::too_many_arguments)]
    fn generate(
        &mut self,
        py: Python<'_>,
        prompt: Prompt,
        max_tokens: usize,
        temperature: f32,
        top_k: usize,
        top_p: f32,
        seed: u64,
        add_bos: Option<bool>,
    ) -> PyResult<String> {
        let params = sampling(temperature, top_k, top_p, seed)?;
        let model = self.model.bind(py).get();
        let mut drafter = self.drafter.bind(py).borrow_mut();
        model.check_drafter(Some(&drafter))?;
        let ids = model.encode(prompt, add_bos)?;
        let (out, st) = model.run(
            py,
            &ids,
            max_tokens,
            params,
            Some(&mut drafter),
            Some(self.config),
        )?;
        self.last = st;
        model.continuation_text(ids.last().copied(), &out)
    }

    /// The last run's metrics, or None before the first.
    #[getter]
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyDict>>> {
        let Some(st) = &self.last else {
            return Ok(None);
        };
        let d = PyDict::new(py);
        d.set_item("prompt_tokens", st.prompt_tokens)?;
        d.set_item("generated_tokens", st.generated_tokens)?;
        d.set_item("drafted", st.drafted)?;
        d.set_item("accepted", st.accepted)?;
        d.set_item("acceptance_rate", st.acceptance_rate())?;
        d.set_item("verifier_passes", st.verifier_passes)?;
        d.set_item("tokens_per_verifier_pass", st.tokens_per_pass())?;
        d.set_item("draft_s", st.draft_secs)?;
        d.set_item("verify_s", st.verify_secs)?;
        d.set_item("prefill_s", st.prefill_secs)?;
        d.set_item("total_s", st.total_secs)?;
        d.set_item(
            "tok_s",
            st.generated_tokens as f64 / st.total_secs.max(1e-9),
        )?;
        d.set_item("stop", st.stop.name())?;
        Ok(Some(d))
    }
}
