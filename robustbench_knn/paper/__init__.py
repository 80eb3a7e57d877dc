"""The paper's subject: IdResNet, the exponential contrastive loss, training, recipe search and its k-NN classifier."""
