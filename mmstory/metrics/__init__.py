"""Standard multimodal metrics computed as the field computes them."""
from .captioning import caption_scores, java_available, tokenize_captions
from .ptb_tokenize import char_tokenize, coco_tokenize
from .retrieval import precision_recall_f1, retrieval_recall, zero_shot_accuracy
from .vqa import normalize_answer, vqa_accuracy

__all__ = ["caption_scores", "java_available", "tokenize_captions", "coco_tokenize", "char_tokenize",
           "retrieval_recall", "zero_shot_accuracy", "precision_recall_f1", "normalize_answer", "vqa_accuracy"]
