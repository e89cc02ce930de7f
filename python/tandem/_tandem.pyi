"""Type stubs for tandem's compiled module."""

from os import PathLike
from typing import Any, Dict, List, Optional, Sequence, Union

_Path = Union[str, PathLike]
_Prompt = Union[str, Sequence[int]]
_Messages = Union[str, Sequence[Dict[str, str]]]

__version__: str

class TandemError(Exception):
    """tandem's one-line error: the file or tensor, and what is wrong."""

def set_threads(threads: int) -> None: ...
def threads() -> int: ...

class Model:
    def __init__(
        self, path: _Path, tokenizer: Optional[_Path] = None, *, activations: str = "int8"
    ) -> None: ...
    @property
    def path(self) -> str: ...
    @property
    def vocab_size(self) -> int: ...
    @property
    def context_length(self) -> int: ...
    @property
    def bos_token_id(self) -> Optional[int]: ...
    @property
    def eos_token_ids(self) -> List[int]: ...
    @property
    def add_bos(self) -> bool: ...
    @property
    def chat_template(self) -> Optional[str]: ...
    def tokenize(self, text: str, add_bos: Optional[bool] = None) -> List[int]: ...
    def detokenize(self, ids: Sequence[int]) -> str: ...
    def generate(
        self,
        prompt: _Prompt,
        max_tokens: int = 128,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int = 0,
        draft: Optional[Drafter] = None,
        add_bos: Optional[bool] = None,
    ) -> str: ...
    def generate_tokens(
        self,
        prompt: _Prompt,
        max_tokens: int = 128,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int = 0,
        draft: Optional[Drafter] = None,
        add_bos: Optional[bool] = None,
    ) -> List[int]: ...
    def chat(
        self,
        messages: _Messages,
        system: Optional[str] = None,
        max_tokens: int = 512,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int = 0,
        draft: Optional[Drafter] = None,
        template: Optional[_Path] = None,
    ) -> str: ...
    def apply_chat_template(
        self,
        messages: _Messages,
        system: Optional[str] = None,
        add_generation_prompt: bool = True,
        template: Optional[_Path] = None,
    ) -> str: ...
    def score(self, text: _Prompt, add_bos: Optional[bool] = None) -> List[float]: ...
    def next_logits(self, tokens: Sequence[int]) -> List[float]: ...

class Drafter:
    @staticmethod
    def ngram(max_ngram: int = 3) -> Drafter: ...
    @staticmethod
    def suffix(max_ngram: int = 8) -> Drafter: ...
    @staticmethod
    def hybrid(lookup: Drafter, model: Drafter) -> Drafter: ...
    @staticmethod
    def self_draft(
        path: _Path, type: str = "q4_0", attention: bool = False, *, activations: str = "int8"
    ) -> Drafter: ...
    @staticmethod
    def model(path: _Path, *, activations: str = "int8") -> Drafter: ...
    def propose(self, tokens: Sequence[int], k: int) -> List[int]: ...
    def accept(self, n: int) -> None: ...
    def reset(self) -> None: ...
    def fork(self) -> Drafter: ...
    min_confidence: float
    @property
    def stats(self) -> Dict[str, int]: ...
    @property
    def vocab_size(self) -> Optional[int]: ...

class SpeculativeDecoder:
    def __init__(
        self,
        model: Model,
        drafter: Drafter,
        draft_max: int = 8,
        adapt: bool = True,
        draft_p_min: float = 0.0,
    ) -> None: ...
    def generate(
        self,
        prompt: _Prompt,
        max_tokens: int = 128,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int = 0,
        add_bos: Optional[bool] = None,
    ) -> str: ...
    @property
    def stats(self) -> Optional[Dict[str, Any]]: ...

def quantize(
    model: _Path,
    out: _Path,
    scheme: Optional[str] = None,
    method: str = "rtn",
    *,
    attention: Optional[str] = None,
    embeddings: Optional[str] = None,
    output: Optional[str] = None,
    edge_mlp: Optional[str] = None,
    rules: Sequence[str] = ...,
    recipe: Optional[_Path] = None,
    format: str = "gguf",
    group_size: int = 32,
    imatrix: Optional[_Path] = None,
    calib_text: Optional[_Path] = None,
    calib_ctx: int = 512,
    calib_chunks: Optional[int] = None,
    calib_self: int = 0,
    gptq_damp: float = 0.3,
    act_order: bool = True,
    force: bool = False,
    allow_nonfinite: bool = False,
    progress: Optional[bool] = None,
) -> Dict[str, Any]: ...
def evaluate(
    reference: _Path,
    models: Sequence[_Path],
    text: _Path,
    ctx: int = 512,
    chunks: Optional[int] = None,
    *,
    out: Optional[_Path] = None,
    cache: Optional[_Path] = None,
    speed_pp: int = 128,
    speed_tg: int = 32,
    progress: Optional[bool] = None,
) -> Dict[str, Any]: ...
