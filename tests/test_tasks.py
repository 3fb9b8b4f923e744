"""Synthetic tasks: generation semantics, determinism, disjoint splits, tokenizer, JSONL, training."""

import json
import random

import pytest
import torch

from dppa_kernels import tasks as T
from dppa_kernels.eval import mean_token_loss

TINY = T.ModelShape(hidden=32, layers=1, heads=2, kv_heads=2, intermediate=64, max_positions=48)


@pytest.fixture
def one_thread():
    """Tiny models train far faster on one thread: two OpenMP threads on a shared 2-core machine
    spend most of each small matmul waiting for each other."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _check_answer(task: str, prompt: str, answer: str) -> None:
    tag, _, rest = prompt.partition(":")
    assert tag == T.get_task(task).tag and rest.endswith("=")
    x = rest[:-1]
    if task == "reverse":
        assert answer == x[::-1]
    elif task == "sort":
        assert answer == "".join(sorted(x))
    elif task == "shift":
        assert answer == "".join(chr((ord(c) - 97 + 1) % 26 + 97) for c in x)
    elif task == "lookup":
        pairs, key = x.split("?")
        table = {pairs[i]: pairs[i + 1] for i in range(0, len(pairs), 2)}
        assert len(table) == len(pairs) // 2 and answer == table[key]
    elif task == "count":
        s, q = x.split("?")
        assert answer == str(s.count(q))
    elif task == "add":
        a, b = x.split("+")
        assert answer == str(int(a) + int(b))
    else:
        raise AssertionError(task)


@pytest.mark.parametrize("task", sorted(T.TASKS))
def test_answers_are_correct_and_in_alphabet(task):
    rng = random.Random(3)
    t = T.get_task(task)
    for size in (t.min_size, (t.min_size + t.max_size) // 2, t.max_size):
        for _ in range(20):
            prompt, answer = t.sample(rng, size)
            _check_answer(task, prompt, answer)
            assert set(prompt + answer) <= set(T.ALPHABET)


@pytest.mark.parametrize("task", sorted(T.TASKS))
def test_splits_deterministic_and_disjoint(task):
    sizes = {"train": 300, "validation": 50, "test": 50}
    a = T.draw_splits(task, sizes, seed=7, size_range=(3, 5))
    b = T.draw_splits(task, sizes, seed=7, size_range=(3, 5))
    assert a == b
    assert a != T.draw_splits(task, sizes, seed=8, size_range=(3, 5))
    assert {k: len(v) for k, v in a.items()} == sizes
    prompts = [ex.prompt for split in a.values() for ex in split]
    assert len(set(prompts)) == len(prompts)
    later = T.draw_splits(task, {"pretrain": 100}, seed=9, size_range=(3, 5), exclude=prompts)
    assert not {ex.prompt for ex in later["pretrain"]} & set(prompts)


def test_split_errors():
    with pytest.raises(ValueError, match="task must be one of"):
        T.draw_splits("nope", {"a": 1}, seed=0, size_range=(1, 2))
    with pytest.raises(ValueError, match="size_range"):
        T.draw_splits("reverse", {"a": 1}, seed=0, size_range=(0, 2))
    with pytest.raises(ValueError, match=r"sizes\['a'\]"):
        T.draw_splits("reverse", {"a": -1}, seed=0, size_range=(1, 2))
    with pytest.raises(ValueError, match="too few distinct prompts"):  # 26 one-letter strings only
        T.draw_splits("reverse", {"a": 27}, seed=0, size_range=(1, 1))


def test_tokenizer_round_trip_and_save_load(tmp_path):
    from transformers import AutoTokenizer

    tok = T.char_tokenizer()
    assert len(tok) == len(T.ALPHABET) + 4
    ids = tok(T.ALPHABET)["input_ids"]
    assert ids[0] == tok.bos_token_id and len(ids) == len(T.ALPHABET) + 1
    assert len(set(ids)) == len(ids)
    assert tok.decode(ids, skip_special_tokens=True) == T.ALPHABET
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    for text in ("rev:abc=", "kv:a1b2?b=", T.ALPHABET):
        assert loaded(text)["input_ids"] == tok(text)["input_ids"]
    assert (loaded.pad_token_id, loaded.bos_token_id, loaded.eos_token_id) == (0, 1, 2)
    assert tok("A")["input_ids"] == [1, tok.unk_token_id]  # outside the alphabet


def test_jsonl_round_trip_and_errors(tmp_path):
    exs = T.draw_splits("lookup", {"x": 20}, seed=1, size_range=(2, 4))["x"]
    path = T.write_jsonl(exs, tmp_path / "sub" / "x.jsonl")
    assert T.read_jsonl(path) == exs
    assert json.loads(path.read_text().splitlines()[0]) == {"prompt": exs[0].prompt, "answer": exs[0].answer}
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "answer": "b"}\n{"prompt": "a"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: expected an object"):
        T.read_jsonl(bad)
    with pytest.raises(ValueError, match="does not exist"):
        T.read_jsonl(tmp_path / "missing.jsonl")


def test_build_model_seeded_and_leaves_rng_alone(one_thread):
    tok = T.char_tokenizer()
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    a, b, c = (T.build_model(tok, TINY, seed=s) for s in (0, 0, 1))
    assert torch.equal(torch.random.get_rng_state(), before)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["model.layers.0.mlp.up_proj.weight"], sc["model.layers.0.mlp.up_proj.weight"])
    assert a.config.vocab_size == len(tok) and not a.config.tie_word_embeddings
    with pytest.raises(ValueError, match="hidden % heads"):
        T.build_model(tok, T.ModelShape(hidden=30, heads=4))


def test_short_training_lowers_loss_and_is_repeatable(one_thread):
    tok = T.char_tokenizer()
    data = T.draw_splits("lookup", {"train": 400, "test": 64}, seed=0, size_range=(2, 3))
    cfg = T.TrainConfig(steps=40, batch_size=32, lr=1e-2, warmup=5)
    models = []
    for _ in range(2):
        m = T.build_model(tok, TINY, seed=0)
        before = mean_token_loss(m, tok, data["test"])
        res = T.train_model(m, tok, data["train"], cfg)
        assert len(res.losses) == 40 and not m.training
        assert mean_token_loss(m, tok, data["test"]) < before - 0.5
        models.append(T.state_dict_of(m))
    assert all(torch.equal(models[0][k], models[1][k]) for k in models[0])


def test_deltas_and_ratio():
    base = {"w": torch.tensor([3.0, 4.0]), "n": torch.tensor([1, 2])}
    ft = {"w": torch.tensor([3.0, 4.5]), "n": torch.tensor([1, 2])}
    d = T.task_deltas(base, ft)
    assert list(d) == ["w"] and torch.equal(d["w"], torch.tensor([0.0, 0.5]))
    assert T.delta_ratio(base, ft) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="different tensors"):
        T.task_deltas(base, {"w": ft["w"]})
