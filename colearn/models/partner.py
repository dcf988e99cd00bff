"""A Partner: a named causal LM with its tokenizer and optimizer, acting on batches of observations; its hidden
states on probe prompts (what CKA compares)."""

from __future__ import annotations

import copy
import json
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from colearn.config import ModelConfig
from colearn.errors import ColearnError
from colearn.models.build import with_checkpointing
from colearn.models.directories import is_mixture, refuse_custom_code
from colearn.models.policy import continuation_stats, legal_action_logprobs, right_padded

VALUE_HEAD_FILE = "value_head.safetensors"  # beside the model's own files in a partner directory
BASE_DIR = "base"  # in a LoRA partner's directory: the frozen base model the adapter applies to
ADAPTER_CONFIG = "adapter_config.json"  # peft's


@dataclass
class Actions:
    texts: list[str]  # the action as the env receives it
    token_ids: list[list[int]]  # the action's tokens as the model produced them
    logprobs: list[float]  # behaviour log-probability of each action (nats)


@dataclass
class Partner:
    name: str
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    cfg: ModelConfig
    envs: list[str] = field(default_factory=list)  # env names this partner acts in
    optimizer: torch.optim.Optimizer | None = None
    value_head: torch.nn.Linear | None = None  # state value from the final hidden state (learn.advantage=gae)
    _prompt_cache: dict[str, list[int]] = field(default_factory=dict, repr=False)
    _action_cache: dict[str, list[int]] = field(default_factory=dict, repr=False)
    _answer_cache: dict[str, tuple[list[int], list[int]]] = field(default_factory=dict, repr=False)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def autocast(self) -> AbstractContextManager:
        """Returns the context the model's forward passes run in: torch.autocast to model.autocast's dtype on the
        partner's device (mixed precision), or no context at all with model.autocast=none. Acting, scoring and
        learning all run in it, so a behaviour log-probability is what the learner recomputes for the same weights."""
        if self.cfg.autocast == "none":
            return nullcontext()
        return torch.autocast(self.device.type, dtype=getattr(torch, self.cfg.autocast))

    def prompt_ids(self, observations: list[str]) -> list[list[int]]:
        """Returns the token ids of each observation's prompt (cached: envs repeat observations)."""
        missing = [o for o in dict.fromkeys(observations) if o not in self._prompt_cache]
        if missing:
            texts = [self.cfg.prompt_template.format(obs=o) for o in missing]
            for o, ids in zip(missing, self.tokenizer(texts, add_special_tokens=True)["input_ids"]):
                self._prompt_cache[o] = ids
        return [self._prompt_cache[o] for o in observations]

    def action_ids(self, names: list[str]) -> list[list[int]]:
        """Returns the token ids of each action text as a continuation of a prompt."""
        for n in names:
            if n not in self._action_cache:
                ids = self.tokenizer(self.cfg.action_prefix + n, add_special_tokens=False)["input_ids"]
                self._action_cache[n] = ids
        return [self._action_cache[n] for n in names]

    def answer_ids(self, charset: str | None) -> list[int] | None:
        """Returns the token ids a free-form answer over `charset` may use: every token whose text is made of
        those characters (spaces around it aside), and the end of sequence; None (any token) without a charset."""
        return self._answer_tokens(charset)[0] if charset else None

    def _answer_tokens(self, charset: str) -> tuple[list[int], list[int]]:
        """Returns (`answer_ids`, every other id of the model's vocabulary: what generation suppresses), cached
        per charset: acting asks at every step."""
        if charset not in self._answer_cache:
            chars = set(charset)
            texts = self.tokenizer.batch_decode([[i] for i in range(len(self.tokenizer))])
            ids = [i for i, t in enumerate(texts) if t.strip() and set(t.strip()) <= chars]
            allowed = sorted({*ids, self.tokenizer.eos_token_id})
            vocab = max(len(self.tokenizer), self.model.get_output_embeddings().weight.shape[0])
            self._answer_cache[charset] = (allowed, sorted(set(range(vocab)) - set(allowed)))
        return self._answer_cache[charset]

    @torch.no_grad()
    def act(
        self,
        observations: list[str],
        legal: list[str] | None,
        greedy: bool,
        generator: torch.Generator,
        temperature: float = 1.0,
        max_new_tokens: int = 8,
        cache: dict | None = None,
        charset: str | None = None,
    ) -> Actions:
        """Returns one action per observation: sampled from (or the argmax of) the distribution over
        the legal actions when `legal` is given (constrained mode), else freely generated text (held to the
        tokens of `charset` when given, see `answer_ids`). `cache` (see `action_logprobs`) is kept by the
        caller for as long as the weights do not change."""
        if legal:
            return self._act_constrained(observations, legal, greedy, generator, temperature, cache)
        return self._act_generate(
            self.prompt_ids(observations), greedy, generator, temperature, max_new_tokens, charset
        )

    @torch.no_grad()
    def action_logprobs(
        self,
        observations: list[str],
        legal: list[str],
        temperature: float = 1.0,
        cache: dict | None = None,
        chunk: int = 256,
    ) -> torch.Tensor:
        """Returns log pi(a | observation) over the legal actions, (observations, K).

        Envs repeat observations (the episodes of a group start alike; small maps have few states), so each
        distinct one is scored once, in chunks of prompts; with `cache` (a dict the caller keeps while the
        weights are fixed, e.g. for one round's acting) also once across calls."""
        cache = {} if cache is None else cache
        key = (tuple(legal), temperature)
        missing = [o for o in dict.fromkeys(observations) if (o, key) not in cache]
        if missing:
            prompts = self.prompt_ids(missing)
            action_ids, pad = self.action_ids(legal), self.tokenizer.pad_token_id
            with self.autocast():
                logps = torch.cat(
                    [
                        legal_action_logprobs(self.model, prompts[i : i + chunk], action_ids, pad, temperature)
                        for i in range(0, len(prompts), chunk)
                    ]
                )
            cache.update(((o, key), row) for o, row in zip(missing, logps))
        return torch.stack([cache[(o, key)] for o in observations])

    def policy_probs(
        self, observations: list[str], legal: list[str], temperature: float = 1.0, greedy: bool = False
    ) -> torch.Tensor:
        """Returns the probability `act` gives each legal action per observation, (observations, K): one-hot on the
        argmax when greedy."""
        logps = self.action_logprobs(observations, legal, temperature)
        return torch.nn.functional.one_hot(logps.argmax(-1), len(legal)).float() if greedy else logps.exp()

    def _act_constrained(self, observations, legal, greedy, generator, temperature, cache) -> Actions:
        action_ids = self.action_ids(legal)
        logps = self.action_logprobs(observations, legal, temperature, cache)
        if greedy:
            choice = logps.argmax(-1)
        else:
            choice = torch.multinomial(logps.exp().cpu(), 1, generator=generator).squeeze(1).to(logps.device)
        chosen = logps.gather(1, choice[:, None]).squeeze(1).tolist()
        picks = choice.tolist()
        return Actions([legal[i] for i in picks], [action_ids[i] for i in picks], chosen)

    def _act_generate(self, prompts, greedy, generator, temperature, max_new_tokens, charset) -> Actions:
        tok = self.tokenizer
        allowed, suppressed = self._answer_tokens(charset) if charset else (None, None)
        flipped = [p[::-1] for p in prompts]
        longest = max(len(p) for p in prompts)
        ids = torch.tensor([[tok.pad_token_id] * (longest - len(p)) + p for p in prompts], device=self.device)
        mask = (torch.arange(longest)[None, :] >= torch.tensor([longest - len(f) for f in flipped])[:, None]).long()
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
        cuda = [self.device] if self.device.type == "cuda" else []  # sampling on a GPU draws from its own RNG
        with self.autocast():
            with torch.random.fork_rng(devices=cuda):
                torch.manual_seed(seed)
                out = self.model.generate(
                    input_ids=ids,
                    attention_mask=mask.to(self.device),
                    max_new_tokens=max_new_tokens,
                    do_sample=not greedy,
                    temperature=temperature if not greedy else None,
                    top_k=None,
                    top_p=None,
                    pad_token_id=tok.pad_token_id,
                    eos_token_id=tok.eos_token_id,
                    suppress_tokens=suppressed,
                    use_cache=True,  # each new token of every live episode attends to the cached keys and values
                )
            conts = [self._until_eos(row) for row in out[:, longest:].tolist()]
            logps, _ = continuation_stats(self.model, prompts, conts, tok.pad_token_id, temperature, allowed)
        texts = [tok.decode(c, skip_special_tokens=True).strip().split("\n")[0] for c in conts]
        return Actions(texts, conts, logps.tolist())

    def _until_eos(self, row: list[int]) -> list[int]:
        eos = self.tokenizer.eos_token_id
        return row[: row.index(eos) + 1] if eos in row else row

    def clone(self, name: str, envs: list[str] | None = None) -> Partner:
        """Returns a copy with its own weights (and value head) and no optimizer state."""
        return Partner(
            name,
            copy.deepcopy(self.model),
            self.tokenizer,
            self.cfg,
            list(envs or self.envs),
            value_head=copy.deepcopy(self.value_head),
        )

    def save(self, path: str | Path, home: str | Path | None = None) -> None:
        """Writes weights, tokenizer and optimizer state into `path` (a Hugging Face model directory).

        A LoRA partner is written as its adapter beside `base/`, the frozen base model; adapter_config.json names
        that base by its absolute path where the directory will live, `home` (default `path`: a caller that
        writes aside and renames into place passes the final place), so AutoPeftModelForCausalLM loads it."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(path)
        self.tokenizer.save_pretrained(path)
        if hasattr(self.model, "peft_config"):  # a LoRA partner: its frozen base goes alongside the adapter
            copy.deepcopy(self.model).unload().save_pretrained(path / BASE_DIR)
            point_adapter_at_base(path, path if home is None else Path(home))
            (path / "README.md").write_text(adapter_card(self.name, self.cfg), encoding="utf-8")  # not peft's stub
        if self.value_head is not None:
            save_file(self.value_head.state_dict(), path / VALUE_HEAD_FILE)
        if self.optimizer is not None:
            torch.save(self.optimizer.state_dict(), path / "optimizer.pt")

    @classmethod
    def load(cls, path: str | Path, name: str, cfg: ModelConfig, device: torch.device | str = "cpu") -> Partner:
        """Returns the partner saved at `path` (weights and tokenizer; optimizer state stays on disk)."""
        path = Path(path)
        if is_mixture(path):
            raise ColearnError(
                f"checkpoint {str(path)!r} is a mixture of several models (mixture.json), not one "
                "partner; load it with colearn.breeding.mixture.load_mixture(path, cfg, device)"
            )
        if not (path / "config.json").exists() and not (path / "adapter_config.json").exists():
            raise ColearnError(f"checkpoint {str(path)!r} has no config.json; is it a colearn/HF model directory?")
        refuse_custom_code(path, "checkpoint")
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
        if (path / "adapter_config.json").exists():
            from peft import PeftModel

            # base/ beside the adapter, not adapter_config.json's absolute path: that one is stale once moved
            refuse_custom_code(path / BASE_DIR, "checkpoint")
            base = AutoModelForCausalLM.from_pretrained(
                path / BASE_DIR, dtype=getattr(torch, cfg.dtype), trust_remote_code=False
            )
            model = PeftModel.from_pretrained(with_checkpointing(base, cfg), path, is_trainable=True)
        else:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, cfg.dtype), trust_remote_code=False)
            model = with_checkpointing(model, cfg)
        partner = cls(name, model.to(device), tokenizer, cfg)
        if (path / VALUE_HEAD_FILE).exists():
            weights = load_file(path / VALUE_HEAD_FILE, device=str(device))
            partner.value_head = new_value_head(weights["weight"].shape[1], device)
            partner.value_head.load_state_dict(weights)
        return partner


@torch.no_grad()
def hidden_states(partner: Partner, probe: list[str], batch_size: int = 64) -> Tensor:
    """Returns the last layer's hidden state at every token of every probe prompt, (tokens, hidden), float32.

    Every token, not only the last: linear CKA needs more samples than features (with fewer, any two
    generic representations score near 1), and a handful of small-grid observations is fewer than a
    model's width; the tokens of those observations are many more.
    """
    prompts = partner.prompt_ids(probe)
    rows = []
    for start in range(0, len(prompts), batch_size):
        ids, mask = right_padded(prompts[start : start + batch_size], partner.tokenizer.pad_token_id, partner.device)
        with partner.autocast():
            out = partner.model(input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=False)
        rows.append(out.hidden_states[-1][mask.bool()].float().cpu())  # (real tokens in chunk, hidden)
    return torch.cat(rows)


def new_value_head(hidden_size: int, device: torch.device | str) -> torch.nn.Linear:
    """Returns a zero-initialized linear value head (every state starts at value 0), float32."""
    head = torch.nn.Linear(hidden_size, 1, device=device)
    torch.nn.init.zeros_(head.weight)
    torch.nn.init.zeros_(head.bias)
    return head


def point_adapter_at_base(directory: Path, home: Path) -> None:
    """Sets `base_model_name_or_path` in the adapter_config.json of the LoRA directory `directory` to the absolute
    path of `home/base`, where its base model lives once the directory is at `home`.

    Absolute, because peft and transformers resolve a relative path against the working directory, not the
    adapter's; so moving the directory makes the path stale, and loading then needs `base/` named explicitly."""
    config_path = directory / ADAPTER_CONFIG
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["base_model_name_or_path"] = str(Path(home).resolve() / BASE_DIR)
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def adapter_card(name: str, cfg: ModelConfig) -> str:
    """Returns the README.md of a LoRA partner directory: what it holds, its prompt format and how to load it."""
    return "\n".join(
        [
            "---",
            "library_name: peft",
            "tags: [colearn, lora]",
            "---",
            "",
            f"# colearn partner {name}",
            "",
            f"A LoRA adapter (peft) on the frozen base model in `{BASE_DIR}/`. A prompt is the observation text put "
            f"into the template {cfg.prompt_template!r} (a Python format string with `obs`); an action continues the "
            f"prompt as {cfg.action_prefix!r} followed by the action's name.",
            "",
            "```python",
            "from peft import AutoPeftModelForCausalLM",
            "from transformers import AutoTokenizer",
            "",
            "model = AutoPeftModelForCausalLM.from_pretrained(DIR)  # DIR: this directory",
            "tokenizer = AutoTokenizer.from_pretrained(DIR)",
            "```",
            "",
            f"adapter_config.json names `{BASE_DIR}/` by its absolute path where the directory was written. Once it "
            f"has moved, name the base yourself: `PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(DIR + "
            f'"/{BASE_DIR}"), DIR)`.',
            "",
        ]
    )
