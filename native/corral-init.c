/*
 * corral-init: PID 1 of a Corral sandbox, and its exec agent.
 *
 * Why: `crun exec` costs 9-14 ms per command on a small VM (crun re-executes itself from a sealed
 * copy, joins seven namespaces and the cgroup, applies seccomp). This init is already inside all
 * of that, so forking a command from here costs well under a millisecond, and the command gets
 * the same namespaces, cgroup, seccomp filter and rlimits by inheritance.
 *
 * Duties of PID 1: reap every child (signalfd for SIGCHLD, then waitpid(-1, WNOHANG) until none
 * is left), never exit. The process is made non-dumpable, so that sandbox processes (even the
 * sandbox's root, which lacks CAP_SYS_PTRACE) cannot open /proc/1/fd, /proc/1/mem or ptrace it.
 *
 * The channel: the server passes a listening AF_UNIX SOCK_SEQPACKET socket as fd 3 (`crun run
 * --preserve-fds 1`). Its path is on the host, outside the sandbox's mount namespace, and the fd
 * is hidden by non-dumpability: nothing inside the sandbox can reach it. Up to MAX_CONNS
 * connections at a time (a restarted server simply connects again).
 *
 * Wire format (native-endian u32 fields; every message is one SEQPACKET record):
 *   header           {type, id}
 *   host -> agent    SPAWN  {uid, gid, flags, ngroups, argc, envc, cols:u16, rows:u16}
 *                           gid_t[ngroups], then cwd, argv[argc], env[envc] as NUL-ended strings
 *                           SCM_RIGHTS: stdin, stdout, stderr (none with F_PTY)
 *                    SIGNAL {pid, signum}: the pid and the process group it is in
 *   agent -> host    HELLO  {version, max_request}            once, on accept
 *                    SPAWNED {pid} (+ SCM_RIGHTS pty master)   answer to SPAWN `id`
 *                    FAILED {stage, errno}                     answer to SPAWN `id`
 *                    EXIT   {pid, wait status}                 to the connection that spawned it
 * The host treats everything this process sends as hostile (it runs inside the sandbox).
 *
 * A command's credentials are those `crun exec` gives (corral.node.runtime.oci.build_exec_process):
 * setgroups/setresgid/setresuid from root; the kernel then clears the permitted and effective
 * capabilities of a non-root user and keeps the bounding set, so setuid `sudo` works. The init
 * runs without no_new_privs for that reason.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <signal.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/ioctl.h>
#include <sys/prctl.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <sys/wait.h>
#include <termios.h>
#include <unistd.h>

#define PROTOCOL_VERSION 1
#define LISTEN_FD 3
#define MAX_CONNS 4
#define MAX_REQUEST (1 << 20)
#define MAX_GROUPS 1024
#define SEND_TIMEOUT_S 10 /* a server that reads nothing for this long loses its connection */

enum { MSG_SPAWN = 1, MSG_SIGNAL = 2, MSG_HELLO = 16, MSG_SPAWNED = 17, MSG_FAILED = 18, MSG_EXIT = 19 };
enum { F_PTY = 1 };
/* Where a spawn failed (FAILED.stage); corral.node.runtime.agent names them. */
enum { ST_REQUEST = 1, ST_PTY, ST_FORK, ST_SESSION, ST_TTY, ST_STDIO, ST_GROUPS, ST_GID, ST_UID, ST_CWD, ST_EXEC };

struct header { uint32_t type, id; };
struct spawn_req { struct header h; uint32_t uid, gid, flags, ngroups, argc, envc; uint16_t cols, rows; };
struct signal_req { struct header h; uint32_t pid, signum; };
struct reply2 { struct header h; uint32_t a, b; }; /* HELLO, FAILED, EXIT */
struct reply1 { struct header h; uint32_t a; };    /* SPAWNED */

/* Epoll tags: what became readable. */
enum { TAG_SIGNAL = 1, TAG_LISTEN, TAG_CONN, TAG_SPAWN };
#define TAG(kind, value) (((uint64_t)(kind) << 32) | (uint32_t)(value))

struct conn { int fd; uint32_t gen; };
/* A command we started. Until `errfd` reads EOF (exec happened) or an error, the spawn is pending. */
struct child { pid_t pid; int slot; uint32_t gen, req; int errfd, master; int started; };

static struct conn conns[MAX_CONNS];
static struct child *children;
static size_t nchildren, cap_children;
static int epfd, sigfd;
static char request[MAX_REQUEST] __attribute__((aligned(8)));

static void watch(int fd, uint64_t tag) {
    struct epoll_event ev = {.events = EPOLLIN, .data.u64 = tag};
    epoll_ctl(epfd, EPOLL_CTL_ADD, fd, &ev);
}

static void close_fd(int *fd) {
    if (*fd >= 0) close(*fd);
    *fd = -1;
}

static void drop_conn(int slot) {
    if (conns[slot].fd < 0) return;
    epoll_ctl(epfd, EPOLL_CTL_DEL, conns[slot].fd, NULL);
    close_fd(&conns[slot].fd);
    conns[slot].gen++; /* late answers for its commands go nowhere */
}

/* One record to a connection (with one fd when `fd` >= 0); a failed send drops the connection. */
static void send_msg(int slot, uint32_t gen, const void *msg, size_t len, int fd) {
    if (conns[slot].fd < 0 || conns[slot].gen != gen) return;
    struct iovec iov = {.iov_base = (void *)msg, .iov_len = len};
    union { char buf[CMSG_SPACE(sizeof(int))]; struct cmsghdr align; } control;
    struct msghdr mh = {.msg_iov = &iov, .msg_iovlen = 1};
    if (fd >= 0) {
        mh.msg_control = control.buf;
        mh.msg_controllen = sizeof control.buf;
        struct cmsghdr *cm = CMSG_FIRSTHDR(&mh);
        cm->cmsg_level = SOL_SOCKET;
        cm->cmsg_type = SCM_RIGHTS;
        cm->cmsg_len = CMSG_LEN(sizeof(int));
        memcpy(CMSG_DATA(cm), &fd, sizeof(int));
    }
    if (sendmsg(conns[slot].fd, &mh, MSG_NOSIGNAL) != (ssize_t)len) drop_conn(slot);
}

static void send2(int slot, uint32_t gen, uint32_t type, uint32_t id, uint32_t a, uint32_t b) {
    struct reply2 r = {{type, id}, a, b};
    send_msg(slot, gen, &r, sizeof r, -1);
}

/* ---- the child: from fork to execve ---------------------------------------------------------- */

struct plan {
    uid_t uid; gid_t gid; size_t ngroups; gid_t groups[MAX_GROUPS];
    const char *cwd; char **argv; char **envp; int stdio[3]; int tty;
};

static _Noreturn void child_fail(int errfd, uint32_t stage) {
    uint32_t report[2] = {stage, (uint32_t)errno};
    ssize_t ignored = write(errfd, report, sizeof report);
    (void)ignored;
    _exit(127);
}

/* execve, searching the command's own PATH (not ours) when argv[0] has no slash, as crun does. */
static void exec_command(char **argv, char **envp) {
    const char *name = argv[0], *path = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
    if (strchr(name, '/')) { execve(name, argv, envp); return; }
    for (char **e = envp; *e; e++)
        if (strncmp(*e, "PATH=", 5) == 0) path = *e + 5;
    int saw_eacces = 0;
    char full[4096];
    for (const char *p = path;; p++) {
        const char *end = strchrnul(p, ':');
        size_t dir = (size_t)(end - p);
        if (dir + 1 + strlen(name) + 1 <= sizeof full) {
            memcpy(full, p, dir);
            full[dir] = '/';
            strcpy(full + dir + 1, name);
            execve(dir ? full : name, argv, envp);
            if (errno == EACCES) saw_eacces = 1;
            else if (errno != ENOENT && errno != ENOTDIR) return;
        }
        if (!*end) break;
        p = end;
    }
    errno = saw_eacces ? EACCES : ENOENT;
}

static _Noreturn void run_child(const struct plan *pl, int errfd) {
    /* Signals as a fresh process expects them: default dispositions, nothing blocked. */
    for (int sig = 1; sig < _NSIG; sig++) signal(sig, SIG_DFL);
    sigset_t none;
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, NULL);
    if (setsid() < 0) child_fail(errfd, ST_SESSION);
    if (pl->tty >= 0 && ioctl(pl->tty, TIOCSCTTY, 0) < 0) child_fail(errfd, ST_TTY);
    /* dup2 leaves the copies without close-on-exec; every other fd of ours has it. The sources are
       >= 3 (fds 0-2 of this process are always open), so no dup2 overwrites a later source. */
    for (int i = 0; i < 3; i++)
        if (dup2(pl->stdio[i], i) < 0) child_fail(errfd, ST_STDIO);
    if (chdir(pl->cwd) < 0) child_fail(errfd, ST_CWD); /* still as root, as `crun exec` does */
    if (setgroups(pl->ngroups, pl->groups) < 0) child_fail(errfd, ST_GROUPS);
    if (setresgid(pl->gid, pl->gid, pl->gid) < 0) child_fail(errfd, ST_GID);
    if (setresuid(pl->uid, pl->uid, pl->uid) < 0) child_fail(errfd, ST_UID);
    exec_command(pl->argv, pl->envp);
    child_fail(errfd, ST_EXEC);
}

/* ---- requests ---------------------------------------------------------------------------------- */

/* The sandbox's own pty (its devpts instance): the master for the host, the slave for the child.
   /dev/pts is a devpts mount the sandbox cannot replace; the fd is checked anyway. */
static int open_pty(uint16_t cols, uint16_t rows, int *slave) {
    int master = open("/dev/pts/ptmx", O_RDWR | O_NOCTTY | O_CLOEXEC | O_NOFOLLOW);
    if (master < 0) return -1;
    struct stat st;
    int unlock = 0;
    struct winsize ws = {.ws_row = rows, .ws_col = cols};
    if (fstat(master, &st) < 0 || !S_ISCHR(st.st_mode) || st.st_rdev != makedev(5, 2)) errno = ENOTTY;
    else if (ioctl(master, TIOCSPTLCK, &unlock) == 0 && ioctl(master, TIOCSWINSZ, &ws) == 0 &&
             (*slave = ioctl(master, TIOCGPTPEER, O_RDWR | O_NOCTTY | O_CLOEXEC)) >= 0)
        return master;
    int saved = errno;
    close(master);
    errno = saved;
    return -1;
}

static void spawn(int slot, const char *buf, size_t len, int *fds, int nfds) {
    const struct spawn_req *rq = (const void *)buf;
    uint32_t id = rq->h.id, gen = conns[slot].gen;
    static struct plan pl; /* large (the groups): static, and copied by fork */
    int master = -1, slave = -1, err[2] = {-1, -1};
    uint32_t stage = ST_REQUEST;
    pl.argv = pl.envp = NULL;
    errno = EINVAL;
    /* Lengths first: the fixed part, the groups, then exactly 1 + argc + envc NUL-ended strings. */
    if (len < sizeof *rq || rq->ngroups > MAX_GROUPS || rq->argc < 1 || rq->argc > MAX_REQUEST ||
        rq->envc > MAX_REQUEST || (rq->flags & ~(uint32_t)F_PTY) || nfds != ((rq->flags & F_PTY) ? 0 : 3))
        goto fail;
    size_t groups_len = rq->ngroups * sizeof(uint32_t), nstrings = 1 + (size_t)rq->argc + rq->envc;
    if (len - sizeof *rq < groups_len + nstrings) goto fail;
    const char *strings = buf + sizeof *rq + groups_len, *end = buf + len;
    size_t nuls = 0;
    for (const char *p = strings; p < end; p++) nuls += (*p == '\0');
    if (nuls != nstrings || end[-1] != '\0') goto fail;
    pl.argv = calloc(rq->argc + 1, sizeof(char *));
    pl.envp = calloc(rq->envc + 1, sizeof(char *));
    if (!pl.argv || !pl.envp) goto fail; /* errno: ENOMEM */
    const char *s = strings;
    pl.cwd = s;
    s += strlen(s) + 1;
    for (uint32_t i = 0; i < rq->argc; i++, s += strlen(s) + 1) pl.argv[i] = (char *)s;
    for (uint32_t i = 0; i < rq->envc; i++, s += strlen(s) + 1) pl.envp[i] = (char *)s;
    pl.uid = rq->uid;
    pl.gid = rq->gid;
    pl.ngroups = rq->ngroups;
    memcpy(pl.groups, buf + sizeof *rq, groups_len);
    pl.tty = -1;
    if (rq->flags & F_PTY) {
        stage = ST_PTY;
        master = open_pty(rq->cols, rq->rows, &slave);
        if (master < 0) goto fail;
        pl.tty = slave;
        pl.stdio[0] = pl.stdio[1] = pl.stdio[2] = slave;
    } else {
        memcpy(pl.stdio, fds, sizeof pl.stdio);
    }
    stage = ST_FORK;
    if (pipe2(err, O_CLOEXEC | O_NONBLOCK) < 0) goto fail;
    if (nchildren == cap_children) {
        size_t cap = cap_children ? 2 * cap_children : 64;
        struct child *more = realloc(children, cap * sizeof *more);
        if (!more) goto fail;
        children = more;
        cap_children = cap;
    }
    pid_t pid = fork();
    if (pid < 0) goto fail;
    if (pid == 0) run_child(&pl, err[1]);
    close_fd(&err[1]);
    close_fd(&slave);
    for (int i = 0; i < nfds; i++) close_fd(&fds[i]);
    free(pl.argv);
    free(pl.envp);
    children[nchildren++] = (struct child){pid, slot, gen, id, err[0], master, 0};
    watch(err[0], TAG(TAG_SPAWN, err[0]));
    return;
fail:;
    uint32_t code = (uint32_t)errno;
    close_fd(&err[0]);
    close_fd(&err[1]);
    close_fd(&slave);
    close_fd(&master);
    for (int i = 0; i < nfds; i++) close_fd(&fds[i]);
    free(pl.argv);
    free(pl.envp);
    send2(slot, gen, MSG_FAILED, id, stage, code);
}

static struct child *find_child(pid_t pid) {
    for (size_t i = 0; i < nchildren; i++)
        if (children[i].pid == pid) return &children[i];
    return NULL;
}

/* SIGNAL: only for a command this connection started and that is not reaped yet (so its pid
   cannot have been recycled); also its process group, unless that is ours. */
static void signal_command(int slot, const struct signal_req *rq) {
    struct child *c = find_child((pid_t)rq->pid);
    if (!c || c->slot != slot || c->gen != conns[slot].gen || rq->signum < 1 || rq->signum >= _NSIG) return;
    pid_t group = getpgid(c->pid);
    if (group > 1 && group != getpgrp()) kill(-group, (int)rq->signum);
    kill(c->pid, (int)rq->signum);
}

static void read_conn(int slot) {
    int fds[3], nfds = 0;
    union { char buf[CMSG_SPACE(sizeof fds)]; struct cmsghdr align; } control;
    struct iovec iov = {.iov_base = request, .iov_len = sizeof request};
    struct msghdr mh = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = control.buf,
                        .msg_controllen = sizeof control.buf};
    ssize_t n = recvmsg(conns[slot].fd, &mh, MSG_DONTWAIT | MSG_CMSG_CLOEXEC);
    if (n < 0 && (errno == EAGAIN || errno == EINTR)) return;
    for (struct cmsghdr *cm = n > 0 ? CMSG_FIRSTHDR(&mh) : NULL; cm; cm = CMSG_NXTHDR(&mh, cm)) {
        if (cm->cmsg_level != SOL_SOCKET || cm->cmsg_type != SCM_RIGHTS) continue;
        int count = (int)((cm->cmsg_len - CMSG_LEN(0)) / sizeof(int));
        for (int i = 0; i < count; i++) {
            int fd;
            memcpy(&fd, CMSG_DATA(cm) + i * sizeof(int), sizeof fd);
            if (nfds < 3) fds[nfds++] = fd;
            else close(fd);
        }
    }
    if (n <= 0 || (size_t)n < sizeof(struct header) || (mh.msg_flags & (MSG_TRUNC | MSG_CTRUNC))) {
        for (int i = 0; i < nfds; i++) close(fds[i]);
        if (n > 0 && (size_t)n >= sizeof(struct header)) { /* too large: answer, keep the connection */
            send2(slot, conns[slot].gen, MSG_FAILED, ((struct header *)request)->id, ST_REQUEST, E2BIG);
            return;
        }
        drop_conn(slot); /* EOF, error, or junk */
        return;
    }
    const struct header *h = (const void *)request;
    if (h->type == MSG_SPAWN) {
        spawn(slot, request, (size_t)n, fds, nfds);
        return;
    }
    for (int i = 0; i < nfds; i++) close(fds[i]);
    if (h->type == MSG_SIGNAL && n == sizeof(struct signal_req)) signal_command(slot, (const void *)request);
    else drop_conn(slot);
}

/* ---- spawn results and exits ------------------------------------------------------------------- */

/* The exec pipe of a pending spawn said something (or the child died): answer the SPAWN. */
static void settle_spawn(struct child *c) {
    uint32_t report[2];
    ssize_t n;
    do n = read(c->errfd, report, sizeof report);
    while (n < 0 && errno == EINTR);
    if (n < 0 && errno == EAGAIN) return; /* a stale event: its exec is still under way */
    epoll_ctl(epfd, EPOLL_CTL_DEL, c->errfd, NULL);
    close_fd(&c->errfd);
    if (n == 0) { /* EOF: the exec happened (close-on-exec closed the pipe) */
        c->started = 1;
        struct reply1 r = {{MSG_SPAWNED, c->req}, (uint32_t)c->pid};
        send_msg(c->slot, c->gen, &r, sizeof r, c->master);
    } else if (n == sizeof report) {
        send2(c->slot, c->gen, MSG_FAILED, c->req, report[0], report[1]);
    } else {
        send2(c->slot, c->gen, MSG_FAILED, c->req, ST_EXEC, EIO);
    }
    close_fd(&c->master);
}

static void reap(void) {
    struct signalfd_siginfo info;
    while (read(sigfd, &info, sizeof info) == sizeof info) {}
    int status;
    pid_t pid;
    while ((pid = waitpid(-1, &status, WNOHANG)) > 0) {
        struct child *c = find_child(pid);
        if (!c) continue; /* an orphan that was reparented to us */
        if (c->errfd >= 0) settle_spawn(c); /* its answer goes first: the pipe is at EOF or has data */
        if (c->started) send2(c->slot, c->gen, MSG_EXIT, 0, (uint32_t)pid, (uint32_t)status);
        *c = children[--nchildren];
    }
}

static void accept_conn(void) {
    int fd = accept4(LISTEN_FD, NULL, NULL, SOCK_CLOEXEC);
    if (fd < 0) return;
    for (int slot = 0; slot < MAX_CONNS; slot++) {
        if (conns[slot].fd >= 0) continue;
        struct timeval timeout = {.tv_sec = SEND_TIMEOUT_S};
        setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &timeout, sizeof timeout);
        conns[slot].fd = fd;
        watch(fd, TAG(TAG_CONN, slot));
        send2(slot, conns[slot].gen, MSG_HELLO, 0, PROTOCOL_VERSION, MAX_REQUEST);
        return;
    }
    close(fd); /* full: the peer reads EOF */
}

int main(void) {
    prctl(PR_SET_DUMPABLE, 0, 0, 0, 0);
    /* fds 0-2 must be open (the children's dup2 relies on received fds being >= 3); everything
       else we inherited must not reach commands. */
    for (int fd = 0; fd < 3; fd++)
        if (fcntl(fd, F_GETFD) < 0 && open("/dev/null", O_RDWR) != fd) return 1;
    close_range(LISTEN_FD, ~0U, CLOSE_RANGE_CLOEXEC);
    sigset_t chld;
    sigemptyset(&chld);
    sigaddset(&chld, SIGCHLD);
    sigprocmask(SIG_BLOCK, &chld, NULL);
    signal(SIGPIPE, SIG_IGN);
    sigfd = signalfd(-1, &chld, SFD_CLOEXEC | SFD_NONBLOCK);
    epfd = epoll_create1(EPOLL_CLOEXEC);
    if (sigfd < 0 || epfd < 0) return 1;
    for (int slot = 0; slot < MAX_CONNS; slot++) conns[slot].fd = -1;
    watch(sigfd, TAG(TAG_SIGNAL, 0));
    struct stat st;
    if (fstat(LISTEN_FD, &st) == 0 && S_ISSOCK(st.st_mode)) watch(LISTEN_FD, TAG(TAG_LISTEN, 0));
    for (;;) { /* PID 1 never exits: its death would end the sandbox */
        struct epoll_event events[16];
        int n = epoll_wait(epfd, events, 16, -1);
        for (int i = 0; i < n; i++) {
            uint32_t kind = (uint32_t)(events[i].data.u64 >> 32), value = (uint32_t)events[i].data.u64;
            if (kind == TAG_SIGNAL) reap();
            else if (kind == TAG_LISTEN) accept_conn();
            else if (kind == TAG_CONN) read_conn((int)value);
            else if (kind == TAG_SPAWN) {
                for (size_t k = 0; k < nchildren; k++)
                    if (children[k].errfd == (int)value) { settle_spawn(&children[k]); break; }
            }
        }
    }
}
