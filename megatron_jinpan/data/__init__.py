"""Data: tokenizers, preprocessing, blended/scheduled datasets, packing, quality tools.

    from megatron_jinpan.data import build_train_data, build_eval_data, check_tokenizer
    check_tokenizer(cfg)                       # ConfigError on a missing tokenizer or vocab > model.vocab_size
    train = build_train_data(cfg)
    mbs = train.microbatches(step, dp_rank, dp_size)
    evals = build_eval_data(cfg)               # {name: obj with .microbatches(i, dp_rank, dp_size)}

Heavy imports (megatron-core, sentencepiece) happen inside the functions.
"""
from .datasets import (EvalData, MockSource, TrainData, build_eval_data, build_train_data, check_tokenizer,
                       collate)
from .blending import BlendSchedule
from .tokenizer import DataError, Tokenizer, load_tokenizer

__all__ = ["build_train_data", "build_eval_data", "check_tokenizer", "TrainData", "EvalData", "MockSource",
           "BlendSchedule", "collate", "load_tokenizer", "Tokenizer", "DataError"]
