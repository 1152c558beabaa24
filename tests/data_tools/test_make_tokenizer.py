"""``python -m data_tools make-tokenizer`` fed hostile options and inputs: what cannot work is one
``error:`` line and exit status 2 with nothing written, a tokenizer folder is never left half-written,
the same inputs give the same files, and any UTF-8 text encodes and decodes back exactly."""

import errno
import json
import os

import pytest

import data_tools.tokenizer as tokenizer_module
from data_tools.cli import build_parser, main
from data_tools.tokenizer import DEMO_TEXTS, build_small_tokenizer
from datacontract.tokenizer import load_tokenizer


SPECIALS = ["<bos>", "<eos>", "<pad>", "<begin_of_image>", "<end_of_image>", "<image_placeholder>"]


def _make(out, *options):
    return main(["make-tokenizer", "--out", str(out), *map(str, options)])


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: "), err
    return err[len("error: "):].rstrip("\n")


def _files(folder) -> dict:
    return {name: (folder / name).read_bytes() for name in sorted(os.listdir(folder))}


def _merges(folder) -> list:
    return json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))["model"]["merges"]


def test_texts_that_cannot_be_read_are_one_error_line(tmp_path, capsys):
    """Before: a FileNotFoundError, IsADirectoryError or UnicodeDecodeError traceback (exit 1)."""
    (tmp_path / "folder").mkdir()
    (tmp_path / "latin1.txt").write_bytes("fine\nstill fine\ncaf\xe9\n".encode("latin-1"))
    cases = {
        "missing.txt": "--texts {}: cannot read it (No such file or directory)",
        "folder": "--texts {} is a folder: give text files (UTF-8, one text a line)",
        "latin1.txt": "--texts {}: line 3 is not UTF-8 (byte 0xe9): convert the file to UTF-8",
    }
    for name, message in cases.items():
        path = str(tmp_path / name)
        assert _make(tmp_path / "tok", "--texts", path) == 2, name
        assert _one_error_line(capsys) == message.format(path)
        assert sorted(os.listdir(tmp_path)) == ["folder", "latin1.txt"]  # no tokenizer, no leftovers


def test_an_out_that_cannot_be_a_folder_is_one_error_line(tmp_path, capsys):
    """Before: FileExistsError / NotADirectoryError tracebacks (exit 1)."""
    (tmp_path / "a-file").write_text("mine")
    assert _make(tmp_path / "a-file") == 2
    assert _one_error_line(capsys) == (f"--out {tmp_path}/a-file is a file: give a folder (make-tokenizer writes "
                                       "tokenizer.json and tokenizer_config.json into it)")
    assert _make(tmp_path / "a-file" / "tok") == 2
    assert _one_error_line(capsys) == (f"--out {tmp_path}/a-file/tok: cannot write {tmp_path}/a-file (Not a "
                                       "directory): check the path, its permissions and the free space")
    assert main(["make-tokenizer", "--out", ""]) == 2
    assert _one_error_line(capsys) == "--out is empty: give a folder for the tokenizer"
    assert os.listdir(tmp_path) == ["a-file"] and (tmp_path / "a-file").read_text() == "mine"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_an_out_in_a_read_only_folder_is_one_error_line(tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    assert _make(locked / "tok") == 2
    assert _one_error_line(capsys) == (f"--out {locked}/tok: cannot write {locked} (Permission denied): check the "
                                       "path, its permissions and the free space")
    assert os.listdir(locked) == []


AT_LEAST = "at least 262 (the 256 byte tokens and the 6 special tokens)"
VOCAB_SIZES = [("0", AT_LEAST), ("10", AT_LEAST), ("261", AT_LEAST), ("-5", AT_LEAST),
               ("1000001", "at most 1000000"), ("100000000000000000000", "at most 1000000")]


@pytest.mark.parametrize("value,bound", VOCAB_SIZES, ids=[v for v, _ in VOCAB_SIZES])
def test_a_vocabulary_size_that_cannot_be_made_is_refused_by_the_option_parser(tmp_path, capsys, value, bound):
    """Before: 0, 10 and 261 silently made 262 tokens, -5 and 10**20 were OverflowError tracebacks and
    10**9 aborted the process asking for 70 GB."""
    with pytest.raises(SystemExit) as stop:
        _make(tmp_path / "tok", "--vocab-size", value)
    assert stop.value.code == 2
    assert f"argument --vocab-size: {value} must be {bound}" in capsys.readouterr().err
    assert not (tmp_path / "tok").exists()


def test_what_was_made_is_said_when_the_texts_give_fewer_tokens_than_asked(tmp_path, capsys):
    """Before: --vocab-size 100000 made 472 tokens without a word."""
    assert _make(tmp_path / "tok", "--vocab-size", 100000) == 0
    out, err = capsys.readouterr()
    assert out == f"{tmp_path}/tok\n"
    assert err == ("made 472 tokens: 256 bytes, 6 special tokens and 210 merges learnt from 3 built-in texts and "
                   "0 lines of --texts (fewer than --vocab-size 100000: the texts give no more merges)\n")
    assert len(load_tokenizer(str(tmp_path / "tok"))) == 472
    assert _make(tmp_path / "smallest", "--vocab-size", 262) == 0
    assert "made 262 tokens: 256 bytes, 6 special tokens and 0 merges" in capsys.readouterr().err


def test_help_shows_every_default_and_says_what_out_is():
    """Before: --out had no help and --vocab-size showed no default."""
    make = build_parser()._subparsers._group_actions[0].choices["make-tokenizer"]
    text = " ".join(make.format_help().split())
    assert "--out OUT folder for the tokenizer (made if missing; a tokenizer already there is replaced" in text
    assert "(default: 512)" in text
    assert "(default: the built-in texts only)" in text


def _fail_after_the_first_file(monkeypatch, error=None):
    """save_pretrained writes tokenizer_config.json and then finds the disk full (or is interrupted)."""
    from transformers import PreTrainedTokenizerFast

    def save_part(self, folder, *args, **kwargs):
        with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
            f.write("{}")
        raise error or OSError(errno.ENOSPC, "No space left on device", os.path.join(folder, "tokenizer.json"))

    monkeypatch.setattr(PreTrainedTokenizerFast, "save_pretrained", save_part)


def test_a_failed_save_leaves_no_tokenizer_folder(tmp_path, capsys, monkeypatch):
    """Before: a folder with tokenizer_config.json alone, which later loads as a broken tokenizer."""
    _fail_after_the_first_file(monkeypatch)
    assert _make(tmp_path / "new" / "tok") == 2
    assert "(No space left on device): check the path, its permissions and the free space" in _one_error_line(capsys)
    assert not (tmp_path / "new" / "tok").exists()
    assert [f for _, _, files in os.walk(tmp_path) for f in files] == []  # nor the hidden staging folder


def test_a_failed_save_keeps_the_earlier_tokenizer_whole(tmp_path, capsys, monkeypatch):
    assert _make(tmp_path / "tok", "--vocab-size", 300) == 0
    earlier = _files(tmp_path / "tok")
    _fail_after_the_first_file(monkeypatch)
    assert _make(tmp_path / "tok") == 2
    capsys.readouterr()
    assert _files(tmp_path / "tok") == earlier


def test_an_interrupted_save_leaves_nothing_behind(tmp_path, monkeypatch):
    """Before: Ctrl-C during the save left a folder with tokenizer_config.json alone."""
    _fail_after_the_first_file(monkeypatch, KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        build_small_tokenizer(str(tmp_path / "tok"), DEMO_TEXTS, 300)
    assert os.listdir(tmp_path) == []


def test_replacing_a_tokenizer_says_so_and_leaves_none_of_its_files(tmp_path, capsys):
    """Before: replaced without a word, and the earlier tokenizer's special_tokens_map.json stayed,
    turning the new tokenizer's BOS into a new token "<s>"."""
    out = tmp_path / "tok"
    assert _make(out, "--vocab-size", 300) == 0
    (out / "special_tokens_map.json").write_text('{"bos_token": "<s>", "eos_token": "</s>"}')
    (out / "notes.txt").write_text("mine")
    capsys.readouterr()
    assert _make(out) == 0
    assert capsys.readouterr().err.startswith(f"replaced the tokenizer that was in {out}: builds made with it must be "
                                              "built again\nmade 472 tokens")
    assert sorted(os.listdir(out)) == ["notes.txt", "tokenizer.json", "tokenizer_config.json"]
    assert load_tokenizer(str(out)).bos_token == "<bos>"
    assert _make(out) == 0  # the same tokenizer again: nothing replaced
    assert "replaced" not in capsys.readouterr().err


def test_the_same_inputs_give_byte_identical_files(tmp_path):
    texts = tmp_path / "texts.txt"
    texts.write_text("".join(f"line {i}: the {i % 7} quick brown foxes, {i * 31 % 101} lazy dogs\n"
                             for i in range(300)))
    for name in ("one", "two"):
        assert _make(tmp_path / name, "--texts", texts, "--vocab-size", 400) == 0
    assert _files(tmp_path / "one") == _files(tmp_path / "two")
    assert len(_merges(tmp_path / "one")) == 400 - 262


HOSTILE = ["", " ", "  two leading, two trailing  ", "tab\tCR\rCRLF\r\nLF\n\n", "NUL\x00byte",
           "\x01\x1b[31mANSI\x7f", "emoji 👩‍👩‍👧‍👦 🇫🇷 ✨", "CJK 漢字かなカナ한국어", "combining e\u0301 and é, ligature ﬁ",
           "\u2028\u2029\u0085\ufeff\U0010ffff", "a<bos>b<begin_of_image>", "<<eos>>",
           "Ġ Ċ ĉ (byte-level's own letters)"]


def test_any_utf8_text_encodes_and_decodes_back_exactly(tmp_path):
    texts = tmp_path / "hostile.txt"
    texts.write_text("\n".join(HOSTILE * 3), encoding="utf-8")
    assert _make(tmp_path / "tok", "--texts", texts) == 0
    tok = load_tokenizer(str(tmp_path / "tok"))
    for text in HOSTILE:
        assert tok.decode(tok.encode(text, add_special_tokens=False)) == text


def test_special_token_strings_in_the_texts_stay_single_tokens_and_are_not_learnt(tmp_path):
    """Before: merges were learnt from the pieces of the special-token strings ("image",
    "placeholder"...), which encoding never produces: it takes each string as its special token."""
    texts = ["".join(SPECIALS) * 20, "<bos>hello<eos>", "hello <image_placeholder> hello"] * 10
    out = tmp_path / "tok"
    build_small_tokenizer(str(out), texts, 400)
    merged = {left + right for left, right in _merges(out)}
    assert "Ġhello" in merged and all(token in "Ġhello" for token in merged), merged  # only the plain text's
    tok = load_tokenizer(str(out))
    for special in SPECIALS:
        assert tok.encode(f"x{special}y", add_special_tokens=False)[1:-1] == [tok.convert_tokens_to_ids(special)]


def test_texts_are_read_as_they_are_trained_on_and_long_lines_in_pieces(tmp_path, monkeypatch):
    """Before: every file was read whole and handed over as one list, so a single line of gigabytes
    was held whole (a 47 MB line took 3.7 GB)."""
    piece_bytes = 7
    monkeypatch.setattr(tokenizer_module, "LINE_PIECE_BYTES", piece_bytes, raising=False)
    given = {}
    real = tokenizer_module.build_small_tokenizer

    def recording(out_dir, texts, vocab_size):
        given["a list"] = isinstance(texts, (list, tuple))
        given["texts"] = list(texts)
        return real(out_dir, given["texts"], vocab_size)

    monkeypatch.setattr(tokenizer_module, "build_small_tokenizer", recording)
    long_line = "漢字かな and ascii, é" * 20
    (tmp_path / "texts.txt").write_bytes(b"\xef\xbb\xbf" + f"{long_line}\r\nshort\n\nlast".encode("utf-8"))
    assert _make(tmp_path / "tok", "--texts", tmp_path / "texts.txt") == 0
    assert not given["a list"]
    from_file = given["texts"][len(DEMO_TEXTS):]
    # A piece may carry the end of a character cut at the previous piece's end (3 bytes at most).
    assert max(len(piece.encode("utf-8")) for piece in from_file) <= piece_bytes + 3
    assert "".join(from_file[:-3]) == long_line  # without the byte-order mark
    assert from_file[-3:] == ["short", "", "last"]
