"A stand-in for torchtext (it cannot load against torch 2.13): only what scgpt's imports name."
