"""Tiny random models of every BGE family, built offline in a directory (for tests and CI).

Adapted from shared/reference/tiny_models_demo.py: each builder trains a small tokenizer with
the `tokenizers` library, builds a randomly initialised model with the real architecture and
saves it in the layout FlagEmbedding loads. The directory basename is the real model name so
FlagAutoModel / FlagAutoReranker and bgert's detection resolve it the same way.
"""
from __future__ import annotations

import json
import os

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

SEED = 1234
H = 32
INIT = 0.2  # HF's default 0.02 makes tiny random models output near-constant values

CORPUS = [
    "what is panda?",
    "hi",
    "The giant panda (Ailuropoda melanoleuca), sometimes called a panda bear or simply panda, "
    "is a bear species endemic to China.",
    "Represent this sentence for searching relevant passages: ",
    "Given a query A and a passage B, determine whether the passage contains an answer to the "
    "query by providing a prediction of either 'Yes' or 'No'.",
    "Predict whether passage B contains an answer to query A.",
    "A: what is panda?\nB: hi\nYes No",
    "BGE M3 is an embedding model supporting dense retrieval, lexical matching and multi-vector interaction.",
    "BM25 is a bag-of-words retrieval function that ranks a set of documents.",
    "What is BGE M3? Definition of BM25",
    "北京是中华人民共和国的首都。 Москва — столица России. 🐼",
] * 4


def build_wordpiece_tokenizer(out_dir: str, max_length: int = 512):
    """BERT-style: WordPiece, lower-casing, [CLS] x [SEP]. The vocabulary is built here rather than
    trained (WordPiece training breaks ties differently run to run): specials, every character alone
    and as a ``##`` continuation, then every word of CORPUS, sorted, so ids are the same every time."""
    from transformers import BertTokenizerFast

    n, p = normalizers.BertNormalizer(lowercase=True), pre_tokenizers.BertPreTokenizer()
    words = {w for text in CORPUS for w, _ in p.pre_tokenize_str(n.normalize_str(text))}
    chars = sorted({c for w in words for c in w})
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + chars + ["##" + c for c in chars] + \
        sorted(words - set(chars))
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "vocab.txt"), "w", encoding="utf-8") as f:
        f.write("\n".join(vocab) + "\n")
    tok = BertTokenizerFast(vocab_file=os.path.join(out_dir, "vocab.txt"), do_lower_case=True,
                            model_max_length=max_length)
    tok.save_pretrained(out_dir)
    return tok


def build_unigram_xlmr_tokenizer(out_dir: str, max_length: int = 512):
    """XLM-R style: Unigram + Metaspace, <s>=0 <pad>=1 </s>=2 <unk>=3, <mask> last."""
    from transformers import XLMRobertaTokenizerFast

    tk = Tokenizer(models.Unigram())
    tk.normalizer = normalizers.NFKC()
    tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tk.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    trainer = trainers.UnigramTrainer(vocab_size=250, unk_token="<unk>",
                                      special_tokens=["<s>", "<pad>", "</s>", "<unk>"])
    tk.train_from_iterator(CORPUS, trainer)
    # Unigram training is not deterministic (ties and float sums vary run to run): fix ids and scores
    vocab = json.loads(tk.to_str())["model"]["vocab"]
    specials, pieces = vocab[:4], sorted(((p, round(sc, 2)) for p, sc in vocab[4:]), key=lambda x: (-x[1], x[0]))
    tk.model = models.Unigram([tuple(v) for v in specials + pieces], unk_id=3, byte_fallback=False)
    tk.add_special_tokens(["<mask>"])
    tk.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>", special_tokens=[("<s>", 0), ("</s>", 2)])
    tok = XLMRobertaTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", sep_token="</s>",
                                  cls_token="<s>", unk_token="<unk>", pad_token="<pad>", mask_token="<mask>",
                                  model_max_length=max_length)
    tok.save_pretrained(out_dir)
    return tok


def build_bpe_tokenizer(out_dir: str, specials: list[str], tokenizer_cls, **special_kwargs):
    """Gemma / Llama (MiniCPM) style BPE on '▁'-joined text; ``specials`` get ids 0..n-1."""
    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.normalizer = normalizers.Replace(" ", "▁")
    tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never")
    tk.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="never")
    tk.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=400, special_tokens=specials))
    tok = tokenizer_cls(tokenizer_object=tk, model_max_length=4096, **special_kwargs)
    tok.save_pretrained(out_dir)
    return tok


def build_bge(root: str, name: str = "bge-small-en-v1.5", layers: int = 2, max_position: int = 512,
              seed: int = SEED) -> str:
    """BGE v1.5 layout: BertModel + WordPiece tokenizer, CLS pooling, normalised (no ST files)."""
    from transformers import BertConfig, BertModel

    d = os.path.join(root, name)
    tok = build_wordpiece_tokenizer(d, max_length=max_position)
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=len(tok), hidden_size=H, num_hidden_layers=layers, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=max_position, pad_token_id=tok.pad_token_id,
                     initializer_range=INIT)
    BertModel(cfg).eval().save_pretrained(d)
    return d


def build_mean_pooling(root: str, name: str = "tiny-mean-minilm", max_seq_length: int = 128,
                       normalize: bool = True) -> str:
    """sentence-transformers layout (modules.json, 1_Pooling mean, Normalize) on a tiny BERT."""
    d = build_bge(root, name, seed=SEED + 1)  # other weights than the tiny BGE: a distinct model
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
    with open(os.path.join(d, "modules.json"), "w") as f:
        json.dump(modules, f)
    os.makedirs(os.path.join(d, "1_Pooling"), exist_ok=True)
    with open(os.path.join(d, "1_Pooling", "config.json"), "w") as f:
        json.dump({"word_embedding_dimension": H, "pooling_mode_cls_token": False, "pooling_mode_mean_tokens": True,
                   "pooling_mode_max_tokens": False, "pooling_mode_mean_sqrt_len_tokens": False}, f)
    with open(os.path.join(d, "sentence_bert_config.json"), "w") as f:
        json.dump({"max_seq_length": max_seq_length, "do_lower_case": False}, f)
    return d


def build_m3(root: str, name: str = "bge-m3") -> str:
    """BGE-M3 layout: XLM-R backbone + colbert_linear.pt + sparse_linear.pt."""
    from transformers import XLMRobertaConfig, XLMRobertaModel

    d = os.path.join(root, name)
    tok = build_unigram_xlmr_tokenizer(d)
    torch.manual_seed(SEED)
    cfg = XLMRobertaConfig(vocab_size=len(tok), hidden_size=H, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=64, max_position_embeddings=514, type_vocab_size=1, pad_token_id=1,
                           bos_token_id=0, eos_token_id=2, initializer_range=INIT)
    XLMRobertaModel(cfg, add_pooling_layer=False).eval().save_pretrained(d)
    colbert = torch.nn.Linear(H, H)
    sparse = torch.nn.Linear(H, 1)
    torch.nn.init.normal_(sparse.weight, std=0.5)
    torch.save(colbert.state_dict(), os.path.join(d, "colbert_linear.pt"))
    torch.save(sparse.state_dict(), os.path.join(d, "sparse_linear.pt"))
    return d


def build_cross_encoder(root: str, name: str = "bge-reranker-v2-m3") -> str:
    """XLMRobertaForSequenceClassification with one label (bge-reranker-base/large/v2-m3)."""
    from transformers import XLMRobertaConfig, XLMRobertaForSequenceClassification

    d = os.path.join(root, name)
    tok = build_unigram_xlmr_tokenizer(d)
    torch.manual_seed(SEED)
    cfg = XLMRobertaConfig(vocab_size=len(tok), hidden_size=H, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=64, max_position_embeddings=514, type_vocab_size=1, pad_token_id=1,
                           bos_token_id=0, eos_token_id=2, num_labels=1, initializer_range=INIT,
                           architectures=["XLMRobertaForSequenceClassification"])
    XLMRobertaForSequenceClassification(cfg).eval().save_pretrained(d)
    return d


def build_bert_cross_encoder(root: str, name: str = "tiny-bert-reranker") -> str:
    """BertForSequenceClassification with one label: a cross-encoder fed token type ids (passage = 1)."""
    from transformers import BertConfig, BertForSequenceClassification

    d = os.path.join(root, name)
    tok = build_wordpiece_tokenizer(d)
    torch.manual_seed(SEED)
    cfg = BertConfig(vocab_size=len(tok), hidden_size=H, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, type_vocab_size=2, num_labels=1, initializer_range=INIT,
                     architectures=["BertForSequenceClassification"])
    BertForSequenceClassification(cfg).eval().save_pretrained(d)
    return d


def build_gemma_reranker(root: str, name: str = "bge-reranker-v2-gemma") -> str:
    """GemmaForCausalLM (bge-reranker-v2-gemma layout)."""
    from transformers import GemmaConfig, GemmaForCausalLM, GemmaTokenizerFast

    d = os.path.join(root, name)
    tok = build_bpe_tokenizer(d, ["<pad>", "<eos>", "<bos>", "<unk>"], GemmaTokenizerFast, pad_token="<pad>",
                              eos_token="<eos>", bos_token="<bos>", unk_token="<unk>")
    torch.manual_seed(SEED)
    cfg = GemmaConfig(vocab_size=len(tok), hidden_size=H, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=2048,
                      pad_token_id=0, eos_token_id=1, bos_token_id=2, initializer_range=INIT,
                      architectures=["GemmaForCausalLM"])
    GemmaForCausalLM(cfg).eval().save_pretrained(d)
    return d


def build_minicpm_layerwise(root: str, name: str = "bge-reranker-v2-minicpm-layerwise", layers: int = 4) -> str:
    """LayerWiseMiniCPMForCausalLM (FlagEmbedding's bundled code), heads for layers 2..layers."""
    from FlagEmbedding.inference.reranker.decoder_only.models.configuration_minicpm_reranker import (
        LayerWiseMiniCPMConfig)
    from FlagEmbedding.inference.reranker.decoder_only.models.modeling_minicpm_reranker import (
        LayerWiseMiniCPMForCausalLM)
    from transformers import LlamaTokenizerFast

    d = os.path.join(root, name)
    tok = build_bpe_tokenizer(d, ["<unk>", "<s>", "</s>"], LlamaTokenizerFast, unk_token="<unk>", bos_token="<s>",
                              eos_token="</s>", pad_token="<unk>", padding_side="left")
    torch.manual_seed(SEED)
    cfg = LayerWiseMiniCPMConfig(vocab_size=len(tok), hidden_size=H, intermediate_size=64, num_hidden_layers=layers,
                                 num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=2048,
                                 scale_emb=12, dim_model_base=256, scale_depth=1.4, start_layer=2, head_multi=True,
                                 head_type="simple", use_cache=False, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                                 rms_norm_eps=1e-5, initializer_range=INIT,
                                 architectures=["LayerWiseMiniCPMForCausalLM"])
    LayerWiseMiniCPMForCausalLM(cfg).eval().save_pretrained(d)
    return d


def build_gemma2_embedder(root: str, name: str = "bge-multilingual-gemma2", layers: int = 2,
                          sliding_window: int = 4096) -> str:
    """Gemma2Model (bge-multilingual-gemma2 layout: FlagLLMModel, last-token pooling), right padding."""
    from transformers import Gemma2Config, Gemma2Model, GemmaTokenizerFast

    d = os.path.join(root, name)
    tok = build_bpe_tokenizer(d, ["<pad>", "<eos>", "<bos>", "<unk>"], GemmaTokenizerFast, pad_token="<pad>",
                              eos_token="<eos>", bos_token="<bos>", unk_token="<unk>", padding_side="right")
    torch.manual_seed(SEED)
    cfg = Gemma2Config(vocab_size=len(tok), hidden_size=H, intermediate_size=64, num_hidden_layers=layers,
                       num_attention_heads=2, num_key_value_heads=1, head_dim=16, query_pre_attn_scalar=16,
                       max_position_embeddings=2048, sliding_window=sliding_window, final_logit_softcapping=30.0,
                       attn_logit_softcapping=50.0, pad_token_id=0, eos_token_id=1, bos_token_id=2,
                       initializer_range=INIT, architectures=["Gemma2Model"])
    Gemma2Model(cfg).eval().save_pretrained(d)
    return d


def build_mistral_embedder(root: str, name: str = "bge-en-icl", layers: int = 2, sliding_window: int | None = 4096,
                           padding_side: str = "left") -> str:
    """MistralModel with a Llama tokenizer (bge-en-icl layout: FlagICLModel, last-token pooling)."""
    from transformers import LlamaTokenizerFast, MistralConfig, MistralModel

    d = os.path.join(root, name)
    tok = build_bpe_tokenizer(d, ["<unk>", "<s>", "</s>"], LlamaTokenizerFast, unk_token="<unk>", bos_token="<s>",
                              eos_token="</s>", pad_token="<unk>", padding_side=padding_side)
    torch.manual_seed(SEED)
    cfg = MistralConfig(vocab_size=len(tok), hidden_size=H, intermediate_size=64, num_hidden_layers=layers,
                        num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=2048,
                        sliding_window=sliding_window, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                        initializer_range=INIT, architectures=["MistralModel"])
    MistralModel(cfg).eval().save_pretrained(d)
    return d


def build_lightweight(root: str, name: str = "bge-reranker-v2.5-gemma2-lightweight", layers: int = 4) -> str:
    """CostWiseGemmaForCausalLM (FlagEmbedding's bundled code; transformers <= 4.47 only), heads for 2..layers."""
    from FlagEmbedding.inference.reranker.decoder_only.models.gemma_config import CostWiseGemmaConfig
    from FlagEmbedding.inference.reranker.decoder_only.models.gemma_model import CostWiseGemmaForCausalLM
    from transformers import GemmaTokenizerFast

    d = os.path.join(root, name)
    tok = build_bpe_tokenizer(d, ["<pad>", "<eos>", "<bos>", "<unk>"], GemmaTokenizerFast, pad_token="<pad>",
                              eos_token="<eos>", bos_token="<bos>", unk_token="<unk>")
    torch.manual_seed(SEED)
    cfg = CostWiseGemmaConfig(vocab_size=len(tok), hidden_size=H, intermediate_size=64, num_hidden_layers=layers,
                              num_attention_heads=2, num_key_value_heads=1, head_dim=16, query_pre_attn_scalar=16,
                              max_position_embeddings=2048, sliding_window=4096, start_layer=2, layer_sep=1,
                              layer_wise=True, final_logit_softcapping=30.0, attn_logit_softcapping=50.0,
                              pad_token_id=0, eos_token_id=1, bos_token_id=2, use_cache=False,
                              initializer_range=INIT, architectures=["CostWiseGemmaForCausalLM"])
    CostWiseGemmaForCausalLM(cfg).eval().save_pretrained(d)
    return d
