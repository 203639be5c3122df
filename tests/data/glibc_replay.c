/* Replays an ops file (malloc.traces.opsfile) through glibc's malloc in a fresh C program and prints its
   peak footprint: break growth since main() began plus the bytes of live mapped chunks. The replay lab's
   glibc baseline runs in an interpreter; tests compare its figure with this one.

   Nothing here allocates through malloc but the trace: the file and the table are mapped, and the
   result is written with write(2). */
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#define IS_MMAPPED 2 /* in the chunk's size word, 8 bytes before the block */

static void fail(const char *what)
{
    write(2, what, strlen(what));
    write(2, "\n", 1);
    _exit(2);
}

static size_t mapped_bytes(void *p)
{
    size_t word = p ? *(const size_t *)((uintptr_t)p - sizeof(size_t)) : 0;
    return word & IS_MMAPPED ? word & ~(size_t)7 : 0;
}

int main(int argc, char **argv)
{
    char *brk0 = sbrk(0);
    if (argc != 2)
        fail("usage: glibc_replay OPSFILE");
    int fd = open(argv[1], O_RDONLY);
    struct stat st;
    if (fd < 0 || fstat(fd, &st) != 0 || st.st_size < 40)
        fail("cannot read the ops file");
    const int64_t *file = mmap(NULL, st.st_size, PROT_READ, MAP_PRIVATE, fd, 0);
    if (file == MAP_FAILED || memcmp(file, "MALLOPS1", 8) != 0)
        fail("not an ops file");
    int64_t ids = file[1], count = file[2], name_length = file[4];
    const int64_t *ops = file + 5 + (name_length + 7) / 8;
    if ((const char *)(ops + 3 * count) > (const char *)file + st.st_size)
        fail("the ops file ends early");
    void **table = mmap(NULL, (ids + 1) * sizeof(void *), PROT_READ | PROT_WRITE,
                        MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (table == MAP_FAILED)
        fail("cannot map the table");
    size_t mapped = 0, peak = 0;
    for (int64_t k = 0; k < count; k++) {
        int64_t code = ops[3 * k], id = ops[3 * k + 1], n = ops[3 * k + 2];
        if (id < 0 || id > ids)
            id = ids; /* -1: NULL, never set */
        void *p = table[id];
        if (code != 0)
            mapped -= mapped_bytes(p);
        if (code == 0)
            p = malloc(n);
        else if (code == 1)
            p = realloc(p, n);
        else {
            free(p);
            p = NULL;
        }
        table[id] = p;
        mapped += mapped_bytes(p);
        size_t now = (size_t)((char *)sbrk(0) - brk0) + mapped;
        if (now > peak)
            peak = now;
    }
    char line[32];
    int length = snprintf(line, sizeof line, "%zu\n", peak);
    write(1, line, length);
    return 0;
}
