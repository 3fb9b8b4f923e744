"""Built-in evaluators against hand-made models and unbatched re-computations."""

import math

import pytest
import torch

from dppa_kernels import eval as E
from dppa_kernels import tasks as T
from dppa_kernels.eval.encoding import encode_pair, encode_prompt

TINY = T.ModelShape(hidden=32, layers=1, heads=2, kv_heads=2, intermediate=64, max_positions=48)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny model trained briefly on lookup (partly right), saved with its tokenizer, and data."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: one thread avoids OpenMP waits on a shared machine
    try:
        tok = T.char_tokenizer()
        data = T.draw_splits("lookup", {"train": 400, "test": 40}, seed=0, size_range=(2, 3))
        model = T.build_model(tok, TINY, seed=0)
        T.train_model(model, tok, data["train"], T.TrainConfig(steps=60, batch_size=32, lr=1e-2, warmup=5))
        root = tmp_path_factory.mktemp("evalmodel")
        model.save_pretrained(root / "model")
        tok.save_pretrained(root / "model")
        path = T.write_jsonl(data["test"], root / "test.jsonl")
        yield model, tok, data["test"], path, root
    finally:
        torch.set_num_threads(n)


def _naive_greedy(model, tok, prompt, n):
    ids = encode_prompt(tok, prompt)
    out = []
    with torch.no_grad():
        for _ in range(n):
            nxt = int(model(torch.tensor([ids + out])).logits[0, -1].argmax())
            if nxt == tok.eos_token_id:
                break
            out.append(nxt)
    return tok.decode(out, skip_special_tokens=True)


def test_exact_match_matches_unbatched_greedy(trained):
    model, tok, exs, path, root = trained
    want = sum(_naive_greedy(model, tok, ex.prompt, 6) == ex.answer for ex in exs) / len(exs)
    assert 0 < want < 1  # partly trained: both outcomes occur, so the comparison can fail
    assert E.exact_match(model, data=path, tokenizer=tok, batch_size=7) == want
    assert E.exact_match(model, data=path, tokenizer=root / "model") == want
    assert E.exact_match_accuracy(model, tok, exs, method="teacher_forced", batch_size=9) == want
    first = sum(_naive_greedy(model, tok, ex.prompt, 6) == ex.answer for ex in exs[:10]) / 10
    assert E.exact_match(model, data=path, tokenizer=tok, limit=10) == first


def test_loss_matches_per_example_hf_loss(trained):
    model, tok, exs, path, _ = trained
    total = count = 0
    with torch.no_grad():
        for ex in exs:
            ids, labels = encode_pair(tok, ex.prompt, ex.answer)
            n = sum(y != -100 for y in labels[1:])
            total += float(model(torch.tensor([ids]), labels=torch.tensor([labels])).loss) * n
            count += n
    assert E.loss(model, data=path, tokenizer=tok, batch_size=6) == pytest.approx(total / count, rel=1e-5)


def test_evaluators_leave_model_unchanged(trained):
    model, tok, _, path, _ = trained
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    E.exact_match(model, data=path, tokenizer=tok)
    E.loss(model, data=path, tokenizer=tok)
    assert model.training
    model.eval()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.fixture(scope="module")
def uniform(tmp_path_factory):
    """A model whose logits are all zero (final norm weight 0): every next-token distribution is
    uniform, and greedy decoding picks id 0, the pad token, which decodes to ''."""
    tok = T.char_tokenizer()
    model = T.build_model(tok, TINY, seed=0)
    with torch.no_grad():
        model.model.norm.weight.zero_()
    return model, tok, tmp_path_factory.mktemp("uniform")


def test_uniform_model_exact_values(uniform):
    model, tok, root = uniform
    path = T.write_jsonl([T.Example("kv:a1?a=", ""), T.Example("kv:b2?b=", " "), T.Example("kv:c3?c=", "3")],
                         root / "pairs.jsonl")
    assert E.exact_match(model, data=path, tokenizer=tok) == pytest.approx(2 / 3)
    ln_v = math.log(len(tok))
    assert E.loss(model, data=path, tokenizer=tok) == pytest.approx(ln_v, rel=1e-6)
    text = root / "text.txt"
    text.write_text("abc" * 40)  # 121 tokens with BOS; windows of 48 positions
    assert E.loss(model, data=text, tokenizer=tok) == pytest.approx(ln_v, rel=1e-6)
    jtext = root / "text.jsonl"
    jtext.write_text('{"text": "hello"}\n{"text": "ab"}\n')
    assert E.loss(model, data=jtext, tokenizer=tok) == pytest.approx(ln_v, rel=1e-6)


def test_directions():
    assert E.exact_match.higher_is_better and E.lm_eval.higher_is_better and not E.loss.higher_is_better
    assert (E.score_direction(E.exact_match), E.score_direction(E.loss), E.score_direction(len)) == (1, -1, 1)


def test_evaluator_errors(uniform):
    model, tok, root = uniform
    path = T.write_jsonl([T.Example("a", "b")], root / "one.jsonl")
    with pytest.raises(ValueError, match="tokenizer is required"):
        E.exact_match(model, data=path)
    with pytest.raises(ValueError, match="does not exist"):
        E.loss(model, data=root / "missing.jsonl", tokenizer=tok)
    with pytest.raises(ValueError, match="limit must be"):
        E.exact_match(model, data=path, tokenizer=tok, limit=0)
    with pytest.raises(ValueError, match="method must be"):
        E.exact_match_accuracy(model, tok, [T.Example("a", "b")], method="beam")
    bad = root / "bad.jsonl"
    bad.write_text('{"text": "a"}\n{"txt": "b"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: expected an object with a string field 'text'"):
        E.loss(model, data=bad, tokenizer=tok)


def test_prepared_data_is_reused_until_the_file_changes(trained, tmp_path, monkeypatch):
    """A search calls the evaluator once per candidate: the tokenizer folder is loaded and the data
    file parsed once, and read again only when the file changes."""
    import transformers

    from dppa_kernels.eval import evaluators

    model, tok, exs, _, root = trained
    reads, loads = [], []
    real_read, real_load = evaluators._read_loss_data, transformers.AutoTokenizer.from_pretrained
    monkeypatch.setattr(evaluators, "_read_loss_data", lambda p: reads.append(p) or real_read(p))
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: loads.append(a) or real_load(*a, **k))
    path = T.write_jsonl(exs[:10], tmp_path / "val.jsonl")
    first = E.loss(model, data=path, tokenizer=root / "model")
    assert E.loss(model, data=path, tokenizer=root / "model") == first and len(reads) == len(loads) == 1
    assert E.loss(model, data=path, tokenizer=tok) == pytest.approx(first, rel=1e-6)  # another tokenizer object
    assert len(reads) == 2 and len(loads) == 1
    T.write_jsonl(exs[10:30], path)  # rewritten: read again, and its own loss
    again = E.loss(model, data=path, tokenizer=root / "model")
    assert len(reads) == 3 and again == pytest.approx(E.mean_token_loss(model, tok, exs[10:30]), rel=1e-6)
    assert again != first
