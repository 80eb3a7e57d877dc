"""What gets evaluated: KNNDefense and the classifier interface, k-NN votes, surrogate logits, loading a --model."""
