"""replayer.keymap: US layout text and key names → X keycodes (X = Linux + 8)."""

from __future__ import annotations

import string

import pytest

from replay_migrate.errors import UsageError
from replayer import keymap as km
from replayer.keymap import Combo, Stroke, char_stroke, combo_keys, key_code, parse_combo, stroke_keys, text_strokes


def test_letters_digits_and_whitespace() -> None:
    assert char_stroke("a") == Stroke(38)  # Linux KEY_A = 30
    assert char_stroke("q") == Stroke(24)
    assert char_stroke("A") == Stroke(38, True)
    assert char_stroke("1") == Stroke(10)
    assert char_stroke("0") == Stroke(19)
    assert char_stroke(" ") == Stroke(65)
    assert char_stroke("\n") == Stroke(36)
    assert char_stroke("\t") == Stroke(23)


def test_every_printable_ascii_character_has_a_stroke() -> None:
    seen: dict[tuple[int, bool], str] = {}
    for ch in string.printable:
        if ch in "\r\x0b\x0c":
            continue
        s = char_stroke(ch)
        assert 8 <= s.keycode <= 255
        assert (s.keycode, s.shift) not in seen, (ch, seen.get((s.keycode, s.shift)))
        seen[(s.keycode, s.shift)] = ch
    assert char_stroke("!") == Stroke(10, True)
    assert char_stroke("~") == Stroke(49, True)
    assert char_stroke('"') == Stroke(48, True)
    assert char_stroke("|") == Stroke(51, True)


def test_matches_the_prototype_table() -> None:
    # gr.py text_to_keys gave Linux keycodes; X = Linux + 8
    assert [(s.keycode - 8, s.shift) for s in text_strokes("Hi, you!\n")] == [
        (35, True), (23, False), (51, False), (57, False), (21, False), (24, False), (22, False), (2, True), (28, False)
    ]
    assert km.linux_keycode(38) == 30


def test_unknown_characters_are_usage_errors() -> None:
    for ch in ["é", "€", "\r", "\x00"]:
        with pytest.raises(UsageError, match="US keyboard"):
            char_stroke(ch)


def test_key_names() -> None:
    assert key_code("Return") == 36 and key_code("enter") == 36
    assert key_code("Escape") == 9 and key_code("esc") == 9
    assert key_code("BackSpace") == 22 and key_code("tab") == 23
    assert key_code("F1") == 67 and key_code("f10") == 76 and key_code("F11") == 95 and key_code("F12") == 96
    assert (key_code("up"), key_code("down"), key_code("left"), key_code("right")) == (111, 116, 113, 114)
    assert key_code("Home") == 110 and key_code("End") == 115 and key_code("Delete") == 119
    assert key_code("PageUp") == 112 and key_code("PageDown") == 117
    assert key_code("ctrl") == 37 and key_code("shift") == 50 and key_code("alt") == 64
    assert key_code("s") == 39 and key_code("7") == 16 and key_code("/") == 61
    with pytest.raises(UsageError, match="unknown key"):
        key_code("hyper")


def test_combos() -> None:
    assert parse_combo("ctrl+s") == Combo((37,), 39)
    assert parse_combo("Ctrl+Shift+T") == Combo((37, 50), 28)
    assert parse_combo("alt+F4") == Combo((64,), 70)
    assert parse_combo("Return") == Combo((), 36)
    assert parse_combo("ctrl+A") == Combo((37, 50), 38)  # upper case implies shift
    assert parse_combo("ctrl+?") == Combo((37, 50), 61)
    assert parse_combo("ctrl++") == Combo((37, 50), 21)
    assert parse_combo("+") == Combo((50,), 21)
    assert parse_combo("shift+shift+a") == Combo((50,), 38)
    for bad in ["", "ctrl+", "a+b", "ctrl+nokey", "ctrl++a"]:
        with pytest.raises(UsageError):
            parse_combo(bad)


def test_press_release_order() -> None:
    assert stroke_keys(Stroke(38)) == [(38, True), (38, False)]
    assert stroke_keys(Stroke(38, True)) == [(50, True), (38, True), (38, False), (50, False)]
    assert combo_keys(parse_combo("ctrl+shift+t")) == [
        (37, True), (50, True), (28, True), (28, False), (50, False), (37, False)
    ]
