"""The ggml/GGUF vocabulary in one place: tensor names (`names`), type facts read from ggml (`types`),
ggml's quantizer (`quant`), the imatrix file format (`imatrix`) and where llama.cpp's libraries are (`lib`).

Import the submodules directly. This package itself imports nothing, so `cpp_patch/build.py` can use
`lib` with the standard library alone, before numpy or gguf are installed.
"""
