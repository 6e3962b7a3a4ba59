"""Pure-Python reproduction of the COCO caption evaluation's tokenisation.

pycocoevalcap tokenises every caption with Stanford CoreNLP 3.4.1's
``PTBTokenizer -preserveLines -lowerCase`` (Java) and then drops the tokens in
``PUNCTUATIONS``.  This module re-implements the parts of that JFlex lexer
(``PTBLexer.flex``) that occur in captions, as a longest-match scanner:
at each position every rule is tried, the longest match wins, ties go to the
earlier rule (JFlex semantics).  Rules with JFlex trailing context
(``A/B``) match ``A B`` for length but only emit ``A``.

Known quirks reproduced on purpose (they are what the field's numbers use):
  * ``(``/``)`` become ``-lrb-``/``-rrb-`` *after* lower-casing, so they are
    NOT removed by pycocoevalcap's upper-case ``-LRB-`` entry;
  * ``!!!`` / ``?!`` stay single tokens and are not removed;
  * abbreviations (``mr.``, ``u.s.``, single letters ``b.``) keep their dot.

It is exercised against the Java tokenizer in ``tests/test_metrics.py``;
exotic inputs (SGML spanning spaces, phone numbers, URLs with odd endings)
may still differ.
"""
from __future__ import annotations

import re
from typing import Callable, Iterable

# Same list as pycocoevalcap.tokenizer.ptbtokenizer.PUNCTUATIONS.
PUNCTUATIONS = ["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-",
                ".", "?", "!", ",", ":", "-", "--", "...", ";"]

_L = r"[^\W\d_\u00B2\u00B3\u00B9\u00BC-\u00BE\u2150-\u218F]"          # a Unicode letter (Java [:letter:]), includes CJK
_AN = r"[^\W_]"           # letter or digit
_APOS = r"['\u0092\u2019]"
_APOSX = r"['\u0092\u2019\u0091\u2018\u201B]"

_ABMONTH = r"Jan|Feb|Mar|Apr|Jun|Jul|Aug|Sep|Sept|Oct|Nov|Dec"
_ABDAYS = r"Mon|Tue|Tues|Wed|Thu|Thurs|Fri"
_ABSTATE = (r"Ala|Ariz|(?-i:A)rk|Calif|Colo|Conn|Dak|Del|Fla|Ga|(?-i:I)ll|Ind|Kans?|Ky|La|(?-i:M)ass|Md|"
            r"Mich|Minn|(?-i:M)iss|Mo|Mont|Neb|Nev|Okla|(?-i:O)re|Pa|Penn|Tenn|Tex|Va|Vt|(?-i:W)ash|Wisc?|Wyo")
_ABCOMP = r"Inc|Cos?|Corp|Pp?tys?|Ltd|Plc|Bancorp|Dept|Bhd|Assn|Univ|Intl|Sys"
_ABNUM = r"Ph|tel|est|ext|sq|ft"
# ABBREV3: only abbreviations when a number follows ("No. 5", "Fig. 3").
_ABBREV3 = r"(?:ca|figs?|prop|nos?|arts?|sects?|paras?|bldg|pp|op|approx)\."
_ABPTIT = r"Jr|Sr|Bros|(?:Ed|Ph)\.D|Blvd|Rd|Esq"
_ABBREV1 = rf"(?:{_ABMONTH}|{_ABDAYS}|{_ABSTATE}|{_ABCOMP}|{_ABNUM}|{_ABPTIT}|etc|al|seq)\."
_ACRO = r"[A-Za-z](?:\.[A-Za-z])+"
_ABTITLE = (r"Mr|Mrs|Ms|(?-i:M)iss|Drs?|Profs?|Sens?|Reps?|Attys?|Lt|Col|Gen|Messrs|Govs?|Adm|"
            r"Rev|Maj|Sgt|Cpl|Pvt|Mt|Capt|Ste?|Ave|Pres|Lieut|Hon|Brig|Co?mdr|Pfc|Spc|Supts?|Det")
_ABBREV2 = rf"(?:{_ACRO}|{_ABTITLE}|vs|Alex|Wm|Jos|Cie|cf|TREAS|Invt|Elec|Natl|M[ft]g|[A-Za-z])\."
_INSENTP = r"[,;:]"
_NUM = r"[-+]?(?:\d*(?:[.:,]\d+)+|\d+)"
_THING = rf"(?:[dDoOlL]{_APOSX}{_AN})?{_AN}+(?:[-_\u058A\u2010\u2011](?:[dDoOlL]{_APOSX}{_AN})?{_AN}+)*"
_HTHING = rf"{_AN}[\w.,]*?(?:-(?:{_AN}+|{_ACRO}\.))+"
_APOWORD = (rf"{_APOS}n{_APOS}?|[lLdDjJ]{_APOS}|ol{_APOS}|{_APOS}em|[A-HJ-XZn]{_APOSX}{_L}{{2,}}|"
            rf"{_APOS}[2-9]0s|{_APOS}till?|{_L}*[aeiouAEIOU]{_APOSX}[aeiouA-Z]{_L}*|{_APOS}cause|"
            rf"cont'd\.?|nor'easter|c'mon|e'er|s'mores|ev'ry|li'l|nat'l")
_SENTEND = r"(?=\s*$|\s+[A-Z])"

_FRACTIONS = {"\u00BC": "1/4", "\u00BD": "1/2", "\u00BE": "3/4", "\u2153": "1/3"}
_CURRENCY = {"\u00A2": "cents", "\u00A3": "#", "\u00A4": "$", "\u0080": "$", "\u20A0": "$", "\u20AC": "$"}
_BRACKETS = {"(": "-LRB-", ")": "-RRB-", "[": "-LSB-", "]": "-RSB-", "{": "-LCB-", "}": "-RCB-"}


def _same(tok: str, full: str) -> list[str]:
    return [tok]


def _quote(tok: str, full: str) -> list[str]:
    # Latex-style quotes; which side only matters for display (all are removed).
    t = tok.replace("\u2019", "'").replace("\u0092", "'")
    t = re.sub(r"[\u0091\u2018\u201B\u2039]", "`", t)
    t = re.sub(r"[\u0093\u201C\u00AB]", "``", t)
    t = re.sub(r"[\u0094\u201D\u00BB]", "''", t)
    return [t]


# (pattern, handler). The pattern's group "tok" is what is consumed/emitted;
# text after it inside the match is JFlex trailing context (counts for
# longest-match, is not consumed). Order = JFlex rule order (tie-break).
_RULES: list[tuple[str, Callable[[str, str], list[str]]]] = [
    (r"(?P<tok>(?i:can))(?i:not)(?!" + _AN + ")", _same),            # cannot -> can not
    (r"(?P<tok>(?i:gon|got|wan|lem|gim))(?i:na|ta|me)(?!" + _AN + ")",
     lambda t, f: [t] if f[len(t):].lower() in {"na", "ta", "me"} and
     (t.lower() + f[len(t):].lower()) in {"gonna", "gotta", "wanna", "lemme", "gimme"} else []),
    (rf"(?P<tok>{_APOS}(?i:t))(?i:is|was)(?!{_AN})", lambda t, f: ["'t"]),  # 'tis -> 't is
    (r"(?P<tok><\/?[A-Za-z!][^>\s]*>)", _same),                      # SGML tag
    (r"(?P<tok>[\u0096\u0097\u2013\u2014\u2015])", lambda t, f: ["--"]),
    (r"(?P<tok>&amp;)", lambda t, f: ["&"]),
    (rf"(?P<tok>{_L}+)(?={_APOS}(?i:[msd]|re|ve|ll))" + rf"{_APOS}(?i:[msd]|re|ve|ll)", _same),
    (rf"(?P<tok>[A-Za-z]*[A-MO-Za-mo-z])(?i:n{_APOSX}t)", _same),
    (rf"(?P<tok>{_L}+)", _same),
    (rf"(?P<tok>{_L}+(?:\.{_L}+)+)", _same),                      # sat.the (one token in 3.4.1)
    (rf"(?P<tok>{_APOWORD})", lambda t, f: [t.replace("\u2019", "'")]),
    (rf"(?P<tok>y{_APOS})(?={_L})", _same),
    (r"(?P<tok>https?://[^\s\"<>|()]+[^\s\"<>|.!?(){},-])", _same),
    (r"(?P<tok>www\.(?:[^\s\"<>|.!?(){},]+\.)+[a-zA-Z]{2,4}(?:/[^\s\"<>|()]*[^\s\"<>|.!?(){},-])?)", _same),
    (r"(?P<tok>[a-zA-Z0-9][^\s\"<>|()\u00A0]*@(?:[^\s\"<>|().\u00A0]+\.)+[a-zA-Z]{2,4})", _same),
    (rf"(?P<tok>{_APOS}(?i:[msd]|re|ve|ll))(?![A-Za-z])", lambda t, f: ["'" + t[1:]]),
    (rf"(?P<tok>(?i:n{_APOSX}t))", lambda t, f: [t[0] + "'t"]),
    (r"(?P<tok>\d{1,2}[-/]\d{1,2}[-/]\d{2,4})", _same),               # DATE
    (rf"(?P<tok>{_NUM})", _same),
    (r"(?P<tok>(?:\d{1,4}-)?\d{1,4}/\d{1,4})", _same),                # FRAC
    (r"(?P<tok>[\u00BC\u00BD\u00BE\u2153])", lambda t, f: [_FRACTIONS[t]]),
    (r"(?P<tok>-(?:RRB|LRB|RCB|LCB|RSB|LSB)-)", _same),
    (r"(?P<tok>[A-Za-z0-9]+(?:-[A-Za-z]+){0,2}(?:/[A-Za-z0-9]+(?:-[A-Za-z]+){0,2}){1,2})", _same),  # THING3
    (r"(?P<tok>[A-Z]*\$|#)", _same),                                  # DOLSIGN
    (r"(?P<tok>[\u00A2\u00A3\u00A4\u00A5\u0080\u20A0\u20AC])", lambda t, f: [_CURRENCY.get(t, t)]),
    (rf"(?P<tok>(?i:{_ABBREV1})){_SENTEND}", lambda t, f: [t, "."]),        # abbrev + sentence end
    (rf"(?P<tok>(?i:{_ABBREV1}))", _same),
    (rf"(?P<tok>(?i:{_ABBREV3}))(?=\s*\d)", _same),
    (rf"(?P<tok>(?i:{_ABBREV2}))", _same),
    (rf"(?P<tok>{_ACRO})(?=\s|$)", _same),
    (rf"(?P<tok>{_APOS}\d\d)(?=\s|$)", _same),
    (rf"(?P<tok>{_L}+\.)(?={_INSENTP})" + _INSENTP, _same),
    (r"(?P<tok>\")(?=[A-Za-z0-9$])", lambda t, f: ["``"]),
    (r"(?P<tok>\")", lambda t, f: ["''"]),
    (r"(?P<tok>[+%&~^|\\=/\u2030\u2031])", _same),
    (r"(?P<tok>[(){}\[\]])", lambda t, f: [_BRACKETS[t]]),
    (r"(?P<tok>-+)", lambda t, f: ["--"] if 3 <= len(t) <= 4 else [t]),
    (r"(?P<tok>\.{3,5}|[\u0085\u2026])", lambda t, f: ["..."]),
    (r"(?P<tok>[#@][A-Za-z_][A-Za-z_0-9]*)", _same),                   # twitter-like #tag @name
    (r"(?P<tok>@+|#+|_+|\*+)", _same),
    (rf"(?P<tok>{_INSENTP})", _same),
    (r"(?P<tok>[?!]+)", _same),
    (r"(?P<tok>[.\u00A1\u00BF])", _same),
    (rf"(?P<tok>{_HTHING})", _same),
    (rf"(?P<tok>{_THING}\.)(?={_INSENTP})" + _INSENTP, _same),
    (rf"(?P<tok>{_THING})", _same),
    (r"(?P<tok>')(?=[A-Za-z][^\s])", lambda t, f: ["`"]),
    (rf"(?P<tok>{_APOS}(?i:[msd]|re|ve|ll))", lambda t, f: ["'" + t[1:]]),
    (r"(?P<tok>''|['\u0092\u2019]|[`\u2018\u2019\u201A\u201B\u201C\u201D\u0091\u0092\u0093\u0094\u201E\u201F\u2039\u203A\u00AB\u00BB]{1,2})",
     _quote),
]
_COMPILED = [(re.compile(p), h) for p, h in _RULES]
_SPACE = re.compile(r"[\s\u00A0\u200B\u200E\u200F\uFEFF]+")


_ABBREV2_RX = re.compile(rf"(?i:{_ABBREV2})")


def ptb_tokenize_line(line: str, next_line: str = "") -> list[str]:
    """PTB-tokenise one line (no lower-casing, no punctuation removal).

    ``next_line``: the following line of the batch. Java tokenises all captions as
    one file, and an ABBREV2 ("b.", "u.s.", "mr.") ending a line is split into
    "b" + "." when the next line starts with an upper-case letter.
    """
    tokens: list[str] = []
    pos, n = 0, len(line)
    while pos < n:
        m = _SPACE.match(line, pos)
        if m:
            pos = m.end()
            continue
        best = None
        for rx, handler in _COMPILED:
            mm = rx.match(line, pos)
            if mm is None:
                continue
            full = mm.group(0)
            if best is None or len(full) > len(best[1]):
                out = handler(mm.group("tok"), full)
                if out:
                    best = (mm.group("tok"), full, out)
        if best is None:  # anything else is a one-character token (e.g. CJK punctuation)
            tokens.append(line[pos])
            pos += 1
            continue
        tok, _, out = best
        tokens.extend(out)
        pos += len(tok)
    if (tokens and next_line[:1].isascii() and next_line[:1].isupper()
            and _ABBREV2_RX.fullmatch(tokens[-1]) and not re.fullmatch(rf"(?i:{_ABBREV1})", tokens[-1])):
        tokens[-1:] = [tokens[-1][:-1], "."]
    return tokens


def coco_tokenize(caption: str, next_caption: str = "") -> str:
    """Tokenise like pycocoevalcap's PTBTokenizer: PTB split, lower-case, drop PUNCTUATIONS.

    ``next_caption`` is the caption after this one in the Java batch (see
    :func:`ptb_tokenize_line`); use :func:`tokenize_batch` to get this right.
    Returns the space-joined token string the COCO scorers consume.
    """
    caption = caption.replace("\n", " ")
    toks = [t.lower() for t in ptb_tokenize_line(caption, next_caption.replace("\n", " ").lstrip())]
    return " ".join(t for t in toks if t not in PUNCTUATIONS)


_CJK = re.compile(r"[\u3400-\u4DBF\u4E00-\u9FFF\uF900-\uFAFF\U00020000-\U0002FFFF\u3040-\u30FF\uAC00-\uD7AF]")


def char_tokenize(caption: str) -> str:
    """Chinese-style tokenisation: every CJK character is its own token.

    Non-CJK spans are tokenised as by :func:`coco_tokenize`; the punctuation
    list is applied to the result as well as full-width CJK punctuation
    (``。，、！？；：``), which PTB does not know about.
    """
    spaced = _CJK.sub(lambda m: f" {m.group(0)} ", caption)
    toks = coco_tokenize(spaced).split()
    zh_punct = set("。，、！？；：“”‘’（）《》「」『』【】…—·")
    return " ".join(t for t in toks if t not in zh_punct)


def tokenize_batch(captions: Iterable[str]) -> list[str]:
    """:func:`coco_tokenize` over a batch in the order PTBTokenizer sees it (one file)."""
    caps = list(captions)
    return [coco_tokenize(c, caps[i + 1] if i + 1 < len(caps) else "") for i, c in enumerate(caps)]
