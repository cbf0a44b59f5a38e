import time, numpy as np, mlx.core as mx
S, N = 10, 7077888 // 4
raw = mx.zeros((S, N), mx.uint32); mx.eval(raw)
view = np.frombuffer(memoryview(raw), dtype=np.uint32).reshape(S, N)
src = np.random.randint(0, 2**31, size=(S, N), dtype=np.uint32)
def t(f, n=5):
    f(); ts=[]
    for _ in range(n):
        a=time.perf_counter(); f(); ts.append(time.perf_counter()-a)
    return min(ts)*1e3
def via_view():
    view[:] = src; mx.eval(mx.sum(raw[:, :8]))  # touch on GPU after CPU write
def via_view_full():
    view[:] = src; mx.eval(mx.sum(raw))
def via_copy():
    a = mx.array(src); mx.eval(mx.sum(a))
def gpu_only():
    mx.eval(mx.sum(raw))
print("cpu write into managed + gpu touch 8 cols ms", t(via_view))
print("cpu write into managed + full gpu read ms", t(via_view_full))
print("mx.array(numpy) + full gpu read ms", t(via_copy))
print("gpu full read (resident) ms", t(gpu_only))
x = mx.random.normal((1,4096)).astype(mx.bfloat16); w = mx.zeros((4096,4096)).astype(mx.bfloat16); mx.eval(x,w)
print("tiny matmul + eval roundtrip ms", t(lambda: mx.eval(x @ w)))
