// The dropout-mask kernel of src/model/dropout.rs: Philox4x32-10, one thread per 4 elements.
// The same arithmetic as `philox4x32_10` and `Mask::block` there; plain C apart from the launch
// indices, so that a test compiles it with the host's C compiler (TANDEM_HOST_TEST) and checks
// it against the Rust, and scripts/build-cuda.sh compiles it with nvcc.
#ifndef TANDEM_HOST_TEST
#define TANDEM_DEVICE __device__
#else
#define TANDEM_DEVICE
#endif
TANDEM_DEVICE void tandem_philox(unsigned int c[4], unsigned int k0, unsigned int k1) {
    for (int r = 0; r < 10; r++) {
        if (r > 0) { k0 += 0x9E3779B9u; k1 += 0xBB67AE85u; }
        unsigned long long p0 = (unsigned long long)0xD2511F53u * c[0];
        unsigned long long p1 = (unsigned long long)0xCD9E8D57u * c[2];
        unsigned int hi0 = (unsigned int)(p0 >> 32), lo0 = (unsigned int)p0;
        unsigned int hi1 = (unsigned int)(p1 >> 32), lo1 = (unsigned int)p1;
        unsigned int n0 = hi1 ^ c[1] ^ k0, n2 = hi0 ^ c[3] ^ k1;
        c[0] = n0; c[1] = lo1; c[2] = n2; c[3] = lo0;
    }
}
TANDEM_DEVICE void tandem_mask_block(float *out, unsigned long long n, unsigned long long g,
                                     unsigned int k0, unsigned int k1, unsigned int site,
                                     unsigned int threshold, float keep) {
    unsigned int c[4] = {(unsigned int)g, (unsigned int)(g >> 32), site, 0u};
    tandem_philox(c, k0, k1);
    for (int j = 0; j < 4; j++) {
        unsigned long long i = 4ull * g + j;
        if (i < n) out[i] = c[j] < threshold ? 0.0f : keep;
    }
}
#ifndef TANDEM_HOST_TEST
extern "C" __global__ void tandem_dropout_mask(float *out, unsigned long long n,
                                               unsigned int k0, unsigned int k1,
                                               unsigned int site, unsigned int threshold,
                                               float keep) {
    unsigned long long g = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (4ull * g < n) tandem_mask_block(out, n, g, k0, k1, site, threshold, keep);
}
#endif
