/* adapterhub's ggml kernels: plain C, loaded with ctypes (converters/formats/native.py). */
#include <stdint.h>

/* The interface version the Python side checks before using this library. */
int ah_abi_version(void) { return 1; }
