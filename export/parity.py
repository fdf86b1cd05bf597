"""Fixed parity texts checked right after every export (the statistics are bgert.quality's)."""
from __future__ import annotations

#: texts of many lengths and scripts, checked right after every export
PARITY_TEXTS: list[str] = [
    "",
    "a",
    "what is a panda?",
    "The giant panda (Ailuropoda melanoleuca) is a bear species endemic to China.",
    "BGE M3 is an embedding model supporting dense retrieval, lexical matching and multi-vector interaction.",
    "北京是中华人民共和国的首都。",
    "Москва — столица России.",
    "مرحبا بالعالم",
    "Emoji test 🐼🎋🔥 and ZWJ 👩‍💻",
    "   leading and trailing spaces   ",
    ("A long scientific abstract about protein folding, retrieval augmented generation and the "
     "statistics of embeddings. " * 60),
]

PARITY_PAIRS: list[tuple[str, str]] = [
    ("what is a panda?", "hi"),
    ("what is a panda?", "The giant panda (Ailuropoda melanoleuca) is a bear species endemic to China."),
    ("What is BGE M3?", "BGE M3 is an embedding model supporting dense retrieval, lexical matching and multi-vector "
                        "interaction."),
    ("", "an empty query"),
    ("an empty passage", ""),
    ("北京是哪里的首都？", "北京是中华人民共和国的首都。"),
    ("long passage", "Retrieval models rank documents by relevance to a query. " * 80),
]
