/*
 * corral-statx.so: preloaded into the programs of gVisor (runsc) sandboxes through /etc/ld.so.preload.
 *
 * Why: the Sentry of Debian's runsc 20221219 refuses the flag AT_NO_AUTOMOUNT with EINVAL, in
 * statx(2) and in newfstatat(2). coreutils 9 passes it to every statx, so `stat`, `ls -l` and
 * `ls -A` fail there ("cannot statx ...: Invalid argument"). The flag only stops the kernel from
 * triggering an automount on the last path component, and gVisor has no automounts: without it
 * the answer is the same.
 *
 * What: glibc's statx, fstatat and fstatat64 are replaced by wrappers that make the system call
 * unchanged and, only when it fails with EINVAL while AT_NO_AUTOMOUNT was set, make it once more
 * without that flag (errno as before the first call). Where the kernel (or a newer gVisor) takes
 * the flag, the first call is the whole story: a program never sees an answer plain glibc would
 * not give.
 *
 * Constraints: async-signal-safe (syscall(2) and errno only: no state, no allocation, no
 * constructor), and no glibc symbol newer than those, so any 64-bit glibc of a template loads it.
 * Static and musl programs do not read /etc/ld.so.preload and keep the plain behaviour; glibc's
 * internal calls (stat, lstat …) never carry the flag. Built by scripts/bootstrap.sh.
 */
#include <errno.h>
#include <sys/syscall.h>
#include <unistd.h>

/* The kernel ABI's value (linux/fcntl.h). No libc prototypes: glibc declares fstatat64 with
 * struct stat64, and only the symbol names and the ABI matter here. */
#define AT_NO_AUTOMOUNT 0x800

int statx(int dirfd, const char *path, int flags, unsigned int mask, void *buf);
int fstatat(int dirfd, const char *path, void *buf, int flags);
int fstatat64(int dirfd, const char *path, void *buf, int flags);

/* Whether a call that returned `result` with `flags` is to be made again without AT_NO_AUTOMOUNT. */
static int refused_automount_flag(long result, int flags) {
    return result == -1 && errno == EINVAL && (flags & AT_NO_AUTOMOUNT);
}

int statx(int dirfd, const char *path, int flags, unsigned int mask, void *buf) {
    int saved = errno;
    long result = syscall(SYS_statx, (long)dirfd, path, (long)flags, (unsigned long)mask, buf);
    if (refused_automount_flag(result, flags)) {
        errno = saved;
        result = syscall(SYS_statx, (long)dirfd, path, (long)(flags & ~AT_NO_AUTOMOUNT), (unsigned long)mask, buf);
    }
    return (int)result;
}

static int stat_at(int dirfd, const char *path, void *buf, int flags) {
    int saved = errno;
    long result = syscall(SYS_newfstatat, (long)dirfd, path, buf, (long)flags);
    if (refused_automount_flag(result, flags)) {
        errno = saved;
        result = syscall(SYS_newfstatat, (long)dirfd, path, buf, (long)(flags & ~AT_NO_AUTOMOUNT));
    }
    return (int)result;
}

/* On 64-bit glibc, struct stat64 is struct stat: both names make the same system call. */
int fstatat(int dirfd, const char *path, void *buf, int flags) {
    return stat_at(dirfd, path, buf, flags);
}

int fstatat64(int dirfd, const char *path, void *buf, int flags) {
    return stat_at(dirfd, path, buf, flags);
}
