"""Pure-Python `torchtext.vocab` with the behaviour scgpt 0.2.4 relies on (see `tests/_official/torchtext`).

scgpt uses: the `vocab(ordered_dict, min_freq=...)` factory; `Vocab(other.vocab)` (wrapping another vocab's
storage, shared, as torchtext wraps its C++ object); `in`, `[token]`, `__call__(tokens)`, `len`,
`insert_token`, `append_token`, `set_default_index`, `get_stoi` / `get_itos` and the lookups. Appends are O(1)
(a dict plus a list): `GeneVocab.from_dict` builds a 60k-gene vocab by inserting at the end one token at a time.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable


class _Storage:
    """The token table itself (torchtext's C++ `VocabPybind`): itos list, stoi dict, default index."""

    def __init__(self, tokens: Iterable[str] = (), default_index: int | None = None):
        self.itos: list[str] = []
        self.stoi: dict[str, int] = {}
        for tok in tokens:
            if tok in self.stoi:
                raise RuntimeError(f"Duplicate token {tok!r} found in tokens list.")
            self.stoi[tok] = len(self.itos)
            self.itos.append(tok)
        self.default_index = default_index


class Vocab:
    """Token <-> index map with an optional default index for unknown tokens."""

    def __init__(self, vocab: _Storage | None = None):
        self.vocab = vocab if vocab is not None else _Storage()

    def __len__(self) -> int:
        return len(self.vocab.itos)

    def __contains__(self, token: str) -> bool:
        return token in self.vocab.stoi

    def __getitem__(self, token: str) -> int:
        idx = self.vocab.stoi.get(token)
        if idx is not None:
            return idx
        if self.vocab.default_index is None:
            raise RuntimeError(f"Token {token} not found and default index is not set")
        return self.vocab.default_index

    def __call__(self, tokens: list[str]) -> list[int]:
        return self.lookup_indices(tokens)

    forward = __call__

    def set_default_index(self, index: int | None) -> None:
        self.vocab.default_index = index

    def get_default_index(self) -> int | None:
        return self.vocab.default_index

    def insert_token(self, token: str, index: int) -> None:
        """Insert `token` at `index`, shifting later tokens; O(1) when `index == len(self)`."""
        s = self.vocab
        if token in s.stoi:
            raise RuntimeError(f"Token {token} already exists in the Vocab with index: {s.stoi[token]}")
        if not 0 <= index <= len(s.itos):
            raise RuntimeError(f"Specified index {index} is out of bounds for vocab of size {len(s.itos)}")
        if index == len(s.itos):
            s.itos.append(token)
        else:
            s.itos.insert(index, token)
            for i in range(index + 1, len(s.itos)):
                s.stoi[s.itos[i]] = i
        s.stoi[token] = index

    def append_token(self, token: str) -> None:
        if token in self.vocab.stoi:
            raise RuntimeError(f"Token {token} already exists in the Vocab with index: {self.vocab.stoi[token]}")
        self.insert_token(token, len(self))

    def lookup_token(self, index: int) -> str:
        if not 0 <= index < len(self):
            raise RuntimeError(f"Specified index {index} is out of bounds for vocab of size {len(self)}")
        return self.vocab.itos[index]

    def lookup_tokens(self, indices: list[int]) -> list[str]:
        return [self.lookup_token(i) for i in indices]

    def lookup_indices(self, tokens: list[str]) -> list[int]:
        return [self[t] for t in tokens]

    def get_stoi(self) -> dict[str, int]:
        return dict(self.vocab.stoi)

    def get_itos(self) -> list[str]:
        return list(self.vocab.itos)


def vocab(ordered_dict: dict[str, int], min_freq: int = 1, specials: list[str] | None = None,
          special_first: bool = True) -> Vocab:
    """torchtext's factory: tokens of `ordered_dict` (in its order) with frequency >= `min_freq`, plus specials."""
    ordered_dict = OrderedDict(ordered_dict)
    specials = list(specials or [])
    for tok in specials:
        ordered_dict.pop(tok, None)
    tokens = [tok for tok, freq in ordered_dict.items() if freq >= min_freq]
    tokens = specials + tokens if special_first else tokens + specials
    return Vocab(_Storage(tokens))


__all__ = ["Vocab", "vocab"]
