class Vocab:
    "torchtext.vocab.Vocab's place in scgpt's class hierarchy; the benchmark never builds one."
    def __init__(self, vocab=None): self.vocab = vocab

def vocab(ordered_dict, min_freq=1, specials=None, special_first=True): raise NotImplementedError("stand-in torchtext")
def build_vocab_from_iterator(*args, **kwargs): raise NotImplementedError("stand-in torchtext")
