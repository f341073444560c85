/*
 * lazy_mmap: an LD_PRELOAD shim that drops MAP_POPULATE from read-only file mappings.
 *
 * llama.cpp maps a model with MAP_POPULATE, which reads the whole file before the load returns:
 * load time grows with model size (seconds per GB from a cold image layer or EFS), the opposite
 * of what mmap is for. Without the flag the load returns at once; llama.cpp's own
 * madvise(MADV_WILLNEED) still starts asynchronous readahead, and warm-up (first request or
 * keep-warm ping) touches the pages. Writable or anonymous mappings are left alone.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stddef.h>
#include <sys/mman.h>
#include <sys/types.h>

typedef void *(*mmap_fn)(void *, size_t, int, int, int, off_t);

static void *forward(const char *name, void *addr, size_t len, int prot, int flags, int fd,
                     off_t offset) {
    mmap_fn real = (mmap_fn)dlsym(RTLD_NEXT, name);
    if (fd >= 0 && !(prot & PROT_WRITE) && !(flags & MAP_ANONYMOUS)) {
        flags &= ~MAP_POPULATE;
    }
    return real(addr, len, prot, flags, fd, offset);
}

void *mmap(void *addr, size_t len, int prot, int flags, int fd, off_t offset) {
    return forward("mmap", addr, len, prot, flags, fd, offset);
}

void *mmap64(void *addr, size_t len, int prot, int flags, int fd, off_t offset) {
    return forward("mmap64", addr, len, prot, flags, fd, offset);
}
