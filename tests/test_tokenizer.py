import json
import random
from pathlib import Path

import pytest
from tokenizers import Tokenizer as RustTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from runtime.errors import TandemError
from runtime.tokenizer import StreamDecoder, Tokenizer

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML = (
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
CORPUS = [
    "Hello world, this is a tiny corpus for a byte-level BPE tokenizer.",
    "def add(a, b):\n    return a + b\n",
    "你好，世界！今天天气很好。我们一起写代码吧。",
    "Emoji time 😀🎉👍🏽 and a family 👨‍👩‍👧 with CJK 漢字 mixed in.",
    "Café naïve résumé — “quotes” and ellipsis…",
]
MIXED = "Hi 你好 😀🎉 café 👨‍👩‍👧 漢字!"


def write_artifact(path: Path, *, template: str | None = CHATML, config: dict | None = None) -> Path:
    tok = RustTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    tok.save(str(path / "tokenizer.json"))
    if config is None:
        eos = {"content": "<|im_end|>", "special": True}  # AddedToken form
        config = {"bos_token": None, "eos_token": eos, "pad_token": "<|endoftext|>"}
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    if template is not None:
        (path / "chat_template.jinja").write_text(template)
    return path


@pytest.fixture
def tok(tmp_path: Path) -> Tokenizer:
    return Tokenizer.from_dir(write_artifact(tmp_path))


def byte_ids(tok: Tokenizer, text: str) -> list[int]:
    """One token per UTF-8 byte (GPT-2 byte-to-unicode alphabet), so every multi-byte character is split."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    char = {b: chr(b if b in printable else next(extra)) for b in range(256)}
    return [tok.token_id(char[b]) for b in text.encode()]


def stream(tok: Tokenizer, ids: list[int], skip_special_tokens: bool = True) -> tuple[str, list[str]]:
    decoder = StreamDecoder(tok, skip_special_tokens=skip_special_tokens)
    deltas = [decoder.push(i) for i in ids]
    deltas.append(decoder.flush())
    return "".join(deltas), deltas


@pytest.mark.parametrize("text", CORPUS + [MIXED, "", "unseen words: zebra квант ∑"])
def test_encode_decode_round_trip(tok: Tokenizer, text: str) -> None:
    assert tok.decode(tok.encode(text)) == text


def test_special_tokens_are_single_ids(tok: Tokenizer) -> None:
    ids = tok.encode("<|im_start|>user\nhi<|im_end|>")
    start, end = tok.token_id("<|im_start|>"), tok.token_id("<|im_end|>")
    assert ids[0] == start and ids[-1] == end
    assert start not in ids[1:-1] and end not in ids[1:-1]
    assert tok.decode(ids) == "user\nhi"
    assert tok.decode(ids, skip_special_tokens=False) == "<|im_start|>user\nhi<|im_end|>"
    assert tok.encode("") == []  # no BOS/EOS added


def test_special_token_properties(tok: Tokenizer) -> None:
    assert tok.eos_token == "<|im_end|>"
    assert tok.eos_token_id == tok.token_id("<|im_end|>")
    assert tok.bos_token is None
    assert tok.token_id("definitely not a token") is None
    assert tok.vocab_size >= 256 + len(SPECIALS)


def test_chat_template_output(tok: Tokenizer) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    expected = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
    assert tok.apply_chat_template(messages, add_generation_prompt=False) == expected
    assert tok.apply_chat_template(messages) == expected + "<|im_start|>assistant\n"


def test_chat_template_from_tokenizer_config(tmp_path: Path) -> None:
    config = {
        "chat_template": "{{ bos_token }}|{{ eos_token }}|{{ foo }}",
        "bos_token": "<|endoftext|>",
        "eos_token": "<|im_end|>",
    }
    write_artifact(tmp_path, template=None, config=config)
    assert Tokenizer.from_dir(tmp_path).apply_chat_template([], foo="bar") == "<|endoftext|>|<|im_end|>|bar"


def test_template_file_wins_over_config(tmp_path: Path) -> None:
    write_artifact(tmp_path, template="file", config={"chat_template": "config"})
    assert Tokenizer.from_dir(tmp_path).apply_chat_template([]) == "file"


def test_tojson_filter(tmp_path: Path) -> None:
    template = (
        "{{ tools | tojson }}\n{{ tools[0] | tojson(indent=2) }}\n"
        "{{ {'b': 1, 'a': '<&>'} | tojson(sort_keys=True, separators=(',', ':')) }}"
    )
    write_artifact(tmp_path, template=template)
    tools = [{"name": "天气", "args": {"x": "<b>"}}]
    out = Tokenizer.from_dir(tmp_path).apply_chat_template([], tools=tools)
    assert out == (
        '[{"name": "天气", "args": {"x": "<b>"}}]\n'
        + json.dumps(tools[0], ensure_ascii=False, indent=2)
        + '\n{"a":"<&>","b":1}'
    )


def test_template_globals_and_loopcontrols(tmp_path: Path) -> None:
    template = (
        "{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}{{ m.content }}{% endfor %}"
        "|{{ strftime_now('%Y') | length }}"
    )
    write_artifact(tmp_path, template=template)
    assert Tokenizer.from_dir(tmp_path).apply_chat_template([{"content": "a"}, {"content": "b"}]) == "a|4"


def test_raise_exception_becomes_tandem_error(tmp_path: Path) -> None:
    write_artifact(tmp_path, template="{{ raise_exception('roles must alternate') }}")
    with pytest.raises(TandemError, match="roles must alternate"):
        Tokenizer.from_dir(tmp_path).apply_chat_template([])


def test_template_errors_become_tandem_errors(tmp_path: Path) -> None:
    write_artifact(tmp_path, template="{{ messages[0].content.upper() }}")
    with pytest.raises(TandemError, match="chat template error"):
        Tokenizer.from_dir(tmp_path).apply_chat_template([])
    write_artifact(tmp_path, template="{% for %}")
    with pytest.raises(TandemError, match="chat template error"):
        Tokenizer.from_dir(tmp_path)


def test_missing_chat_template(tmp_path: Path) -> None:
    tok = Tokenizer.from_dir(write_artifact(tmp_path, template=None, config={}))
    assert tok.encode("hi")  # the tokenizer itself still works
    with pytest.raises(TandemError, match="chat template"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])


def test_missing_tokenizer_json_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(TandemError, match="tokenizer.json"):
        Tokenizer.from_dir(tmp_path)


@pytest.mark.parametrize("text", CORPUS + [MIXED])
def test_stream_decoder_never_splits_characters(tok: Tokenizer, text: str) -> None:
    ids = tok.encode(text)
    full, deltas = stream(tok, ids)
    assert full == text
    assert not any("\ufffd" in d for d in deltas)


def test_stream_decoder_byte_by_byte(tok: Tokenizer) -> None:
    full, deltas = stream(tok, byte_ids(tok, MIXED))
    assert full == MIXED
    assert all(len(d) <= 1 and d != "\ufffd" for d in deltas)  # each character as soon as its last byte arrives


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_stream_decoder_matches_full_decode_on_random_ids(tok: Tokenizer, skip_special_tokens: bool) -> None:
    rng = random.Random(0)
    special = [tok.token_id(t) for t in SPECIALS]
    multibyte = [i for t in CORPUS for i in tok.encode(t)]
    for _ in range(500):
        n = rng.randint(0, 30)
        pool = rng.choice([range(tok.vocab_size), multibyte, range(256)])
        ids = [rng.choice(special) if rng.random() < 0.1 else rng.choice(pool) for _ in range(n)]
        full, _ = stream(tok, ids, skip_special_tokens)
        assert full == tok.decode(ids, skip_special_tokens=skip_special_tokens), ids


@pytest.mark.slow
def test_real_qwen_tokenizer(real_artifacts) -> None:
    tok = Tokenizer.from_dir(real_artifacts["cpu"])
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}]) == (
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )
    assert tok.eos_token == "<|im_end|>"
    assert len(tok.encode("<|im_start|>")) == 1
    text = "你好，世界！😀🎉👨‍👩‍👧 漢字 café"
    ids = tok.encode(text)
    full, deltas = stream(tok, ids)
    assert full == text and not any("\ufffd" in d for d in deltas)
    assert stream(tok, byte_ids(tok, text))[0] == text
