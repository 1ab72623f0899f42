// LD_PRELOAD allocation counter used by wsbridge-bench to count heap allocations per
// bridged message in wsbridged. It forwards to glibc's own entry points (no dlsym, so
// no bootstrap recursion) and counts with relaxed atomics. On SIGUSR2 it writes
// "<seq> <allocs> <frees> <bytes>\n" to the file named by WSBRIDGE_ALLOC_FILE.
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

extern void* __libc_malloc(size_t);
extern void* __libc_calloc(size_t, size_t);
extern void* __libc_realloc(void*, size_t);
extern void* __libc_memalign(size_t, size_t);
extern void __libc_free(void*);

static atomic_ulong g_allocs, g_frees, g_bytes, g_seq;
static char g_path[512];

void* malloc(size_t n) {
  atomic_fetch_add_explicit(&g_allocs, 1, memory_order_relaxed);
  atomic_fetch_add_explicit(&g_bytes, n, memory_order_relaxed);
  return __libc_malloc(n);
}
void* calloc(size_t a, size_t b) {
  atomic_fetch_add_explicit(&g_allocs, 1, memory_order_relaxed);
  atomic_fetch_add_explicit(&g_bytes, a * b, memory_order_relaxed);
  return __libc_calloc(a, b);
}
void* realloc(void* p, size_t n) {
  atomic_fetch_add_explicit(&g_allocs, 1, memory_order_relaxed);
  atomic_fetch_add_explicit(&g_bytes, n, memory_order_relaxed);
  return __libc_realloc(p, n);
}
void free(void* p) {
  if (p) atomic_fetch_add_explicit(&g_frees, 1, memory_order_relaxed);
  __libc_free(p);
}
void* memalign(size_t al, size_t n) {
  atomic_fetch_add_explicit(&g_allocs, 1, memory_order_relaxed);
  atomic_fetch_add_explicit(&g_bytes, n, memory_order_relaxed);
  return __libc_memalign(al, n);
}
void* aligned_alloc(size_t al, size_t n) { return memalign(al, n); }
int posix_memalign(void** out, size_t al, size_t n) {
  void* p = memalign(al, n);
  if (!p) return ENOMEM;
  *out = p;
  return 0;
}

// Async-signal-safe decimal formatting.
static char* PutU(char* at, unsigned long v) {
  char tmp[24];
  int n = 0;
  do { tmp[n++] = (char)('0' + v % 10); v /= 10; } while (v);
  while (n) *at++ = tmp[--n];
  return at;
}

static void OnSignal(int sig) {
  (void)sig;
  int saved = errno;
  char buf[128];
  char* at = buf;
  at = PutU(at, atomic_fetch_add(&g_seq, 1) + 1); *at++ = ' ';
  at = PutU(at, atomic_load(&g_allocs)); *at++ = ' ';
  at = PutU(at, atomic_load(&g_frees)); *at++ = ' ';
  at = PutU(at, atomic_load(&g_bytes)); *at++ = '\n';
  int fd = open(g_path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
  if (fd >= 0) {
    ssize_t w = write(fd, buf, (size_t)(at - buf));
    (void)w;
    close(fd);
  }
  errno = saved;
}

__attribute__((constructor)) static void Init(void) {
  const char* p = getenv("WSBRIDGE_ALLOC_FILE");
  if (!p || strlen(p) >= sizeof(g_path)) return;
  strcpy(g_path, p);
  struct sigaction sa;
  memset(&sa, 0, sizeof sa);
  sa.sa_handler = OnSignal;
  sa.sa_flags = SA_RESTART;
  sigaction(SIGUSR2, &sa, NULL);
}
