"""Model operations tunelab supplies itself: packed attention (`packed_attention`, with its kernels
`packed_kernels` and the C++ CPU kernel `cpu_attention`). Nothing here changes transformers on
import; `packed_attention.use_packed_attention(model)` registers what it needs when called."""
