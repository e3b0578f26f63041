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
 *   host -> agent    SPAWN  {uid, gid, flags, ngroups, argc, envc, desclen, cols:u16, rows:u16}
 *                           gid_t[ngroups], description[desclen], then cwd, argv[argc], env[envc]
 *                           as NUL-ended strings
 *                           SCM_RIGHTS: stdin, stdout, stderr (none with F_PTY), then with F_KEEP
 *                           the host's ends: stdout, stderr (read), and stdin (write) with F_STDIN
 *                    SIGNAL {pid, signum}: the pid and the process group it is in
 *                    ADOPT  {}: hand over every kept process no live connection owns
 *                    CLOSE_STDIN {pid}: drop the kept stdin end (the host closed its own)
 *   agent -> host    HELLO  {version, max_request}            once, on accept
 *                    SPAWNED {pid} (+ SCM_RIGHTS pty master)   answer to SPAWN `id`
 *                    FAILED {stage, errno}                     answer to SPAWN `id`
 *                    EXIT   {pid, wait status}                 to the connection that owns it
 *                    PROCESS {pid, flags, wait status, desclen} description[desclen]
 *                           + SCM_RIGHTS the kept ends         one per process, answer to ADOPT `id`
 *                    ADOPTED {count}                           the end of the answer to ADOPT `id`
 * The host treats everything this process sends as hostile (it runs inside the sandbox).
 *
 * Kept processes (F_KEEP): so that a process outlives the server that started it, the agent keeps
 * a copy of the host's ends of its stdio (pipe ends, or the pty master) and the host's opaque
 * description of it. While no server holds the other copies, a writer blocks on a full pipe
 * instead of getting EPIPE, and a pty session gets no hangup. Once the owning connection is gone
 * (the server died or stopped), its processes are orphans: an orphan that exits is remembered
 * with its status. ADOPT hands the orphans (their description, ends and any exit status) to the
 * asking connection, which owns them from then on; an exit reported to a live owner, or an
 * orphan's exit handed over, forgets the process. Bounds: at most MAX_KEPT kept processes (later
 * ones run as unkept: they end with their server's ends as before), at most MAX_EXITED remembered
 * exits (the oldest is forgotten first), descriptions of at most MAX_DESCRIPTION bytes.
 * Only host root can connect (see above), so every connection speaks for the server.
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

#define PROTOCOL_VERSION 2
#define LISTEN_FD 3
#define MAX_CONNS 4
#define MAX_REQUEST (1 << 20)
#define MAX_GROUPS 1024
#define SEND_TIMEOUT_S 10 /* a server that reads nothing for this long loses its connection */
#define MAX_KEPT 1024
#define MAX_EXITED 256
#define MAX_DESCRIPTION (16 << 10)

enum {
    MSG_SPAWN = 1, MSG_SIGNAL = 2, MSG_ADOPT = 3, MSG_CLOSE_STDIN = 4,
    MSG_HELLO = 16, MSG_SPAWNED = 17, MSG_FAILED = 18, MSG_EXIT = 19, MSG_PROCESS = 20, MSG_ADOPTED = 21,
};
enum { F_PTY = 1, F_KEEP = 2, F_STDIN = 4 };    /* SPAWN flags */
enum { P_PTY = 1, P_EXITED = 2, P_STDIN = 4 };  /* PROCESS flags */
/* Where a spawn failed (FAILED.stage); corral.node.runtime.agent names them. */
enum { ST_REQUEST = 1, ST_PTY, ST_FORK, ST_SESSION, ST_TTY, ST_STDIO, ST_GROUPS, ST_GID, ST_UID, ST_CWD, ST_EXEC };

struct header { uint32_t type, id; };
struct spawn_req { struct header h; uint32_t uid, gid, flags, ngroups, argc, envc, desclen; uint16_t cols, rows; };
struct signal_req { struct header h; uint32_t pid, signum; };
struct pid_req { struct header h; uint32_t pid; };                          /* CLOSE_STDIN */
struct process_rec { struct header h; uint32_t pid, flags, status, desclen; }; /* PROCESS */
struct reply2 { struct header h; uint32_t a, b; }; /* HELLO, FAILED, EXIT */
struct reply1 { struct header h; uint32_t a; };    /* SPAWNED */

/* Epoll tags: what became readable. */
enum { TAG_SIGNAL = 1, TAG_LISTEN, TAG_CONN, TAG_SPAWN };
#define TAG(kind, value) (((uint64_t)(kind) << 32) | (uint32_t)(value))

struct conn { int fd; uint32_t gen; };
/* A command we started, owned by connection (slot, gen). Until `errfd` reads EOF (exec happened)
   or an error, the spawn is pending. A kept one holds the host's ends in `kept` (pipes: stdout,
   stderr, stdin with P_STDIN; pty: the master) and its description; an exited one (an orphan's
   exit, not yet handed over) is reaped already: its pid may be in use by another process. */
struct child {
    pid_t pid; int slot; uint32_t gen, req; int errfd, started;
    int kept[3], nkept, counted; uint32_t flags; char *desc; uint32_t desclen;
    int exited; uint32_t status; uint64_t exit_seq;
};

static struct conn conns[MAX_CONNS];
static struct child *children;
static size_t nchildren, cap_children, nkept_children, nexited;
static uint64_t exit_counter;
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

static int owner_alive(const struct child *c) {
    return conns[c->slot].fd >= 0 && conns[c->slot].gen == c->gen;
}

/* One record (two parts) to a connection, with `nfds` fds; a failed send drops the connection. */
static void send_parts(int slot, uint32_t gen, const void *msg, size_t len, const void *tail, size_t tail_len,
                       const int *fds, int nfds) {
    if (conns[slot].fd < 0 || conns[slot].gen != gen) return;
    struct iovec iov[2] = {{.iov_base = (void *)msg, .iov_len = len}, {.iov_base = (void *)tail, .iov_len = tail_len}};
    union { char buf[CMSG_SPACE(3 * sizeof(int))]; struct cmsghdr align; } control;
    struct msghdr mh = {.msg_iov = iov, .msg_iovlen = tail_len ? 2 : 1};
    if (nfds > 0) {
        mh.msg_control = control.buf;
        mh.msg_controllen = CMSG_SPACE(nfds * sizeof(int));
        struct cmsghdr *cm = CMSG_FIRSTHDR(&mh);
        cm->cmsg_level = SOL_SOCKET;
        cm->cmsg_type = SCM_RIGHTS;
        cm->cmsg_len = CMSG_LEN(nfds * sizeof(int));
        memcpy(CMSG_DATA(cm), fds, nfds * sizeof(int));
    }
    if (sendmsg(conns[slot].fd, &mh, MSG_NOSIGNAL) != (ssize_t)(len + tail_len)) drop_conn(slot);
}

static void send_msg(int slot, uint32_t gen, const void *msg, size_t len, int fd) {
    send_parts(slot, gen, msg, len, NULL, 0, &fd, fd >= 0 ? 1 : 0);
}

static void send2(int slot, uint32_t gen, uint32_t type, uint32_t id, uint32_t a, uint32_t b) {
    struct reply2 r = {{type, id}, a, b};
    send_msg(slot, gen, &r, sizeof r, -1);
}

/* Let go of what a child keeps (the process may go on, unkept). */
static void release(struct child *c) {
    for (int i = 0; i < c->nkept; i++) close_fd(&c->kept[i]);
    c->nkept = 0;
    c->flags &= ~(uint32_t)P_STDIN;
    free(c->desc);
    c->desc = NULL;
    c->desclen = 0;
    if (c->counted) nkept_children--;
    c->counted = 0;
}

static void forget(struct child *c) {
    release(c);
    if (c->exited) nexited--;
    if (c->errfd >= 0) {
        epoll_ctl(epfd, EPOLL_CTL_DEL, c->errfd, NULL);
        close_fd(&c->errfd);
    }
    *c = children[--nchildren];
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
    char *desc = NULL;
    pl.argv = pl.envp = NULL;
    errno = EINVAL;
    /* Lengths first: the fixed part, the groups, the description, then exactly 1 + argc + envc
       NUL-ended strings; the fds: the child's three (none for a pty), then the host's ends. */
    if (len < sizeof *rq) goto fail;
    uint32_t flags = rq->flags;
    int pty = (flags & F_PTY) != 0, keep = (flags & F_KEEP) != 0;
    int want_fds = pty ? 0 : 3 + (keep ? 2 + ((flags & F_STDIN) ? 1 : 0) : 0);
    if (rq->ngroups > MAX_GROUPS || rq->argc < 1 || rq->argc > MAX_REQUEST || rq->envc > MAX_REQUEST ||
        rq->desclen > MAX_DESCRIPTION || (flags & ~(uint32_t)(F_PTY | F_KEEP | F_STDIN)) ||
        ((flags & F_STDIN) && (pty || !keep)) || nfds != want_fds)
        goto fail;
    size_t groups_len = rq->ngroups * sizeof(uint32_t), nstrings = 1 + (size_t)rq->argc + rq->envc;
    if (len - sizeof *rq < groups_len + rq->desclen + nstrings) goto fail;
    const char *strings = buf + sizeof *rq + groups_len + rq->desclen, *end = buf + len;
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
    keep = keep && nkept_children < MAX_KEPT; /* over the bound: it runs, unkept */
    if (keep && rq->desclen) {
        if (!(desc = malloc(rq->desclen))) goto fail; /* errno: ENOMEM */
        memcpy(desc, buf + sizeof *rq + groups_len, rq->desclen);
    }
    if (pty) {
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
    for (int i = 0; i < 3 && i < nfds; i++) close_fd(&fds[i]); /* the child's ends */
    free(pl.argv);
    free(pl.envp);
    struct child c = {.pid = pid, .slot = slot, .gen = gen, .req = id, .errfd = err[0],
                      .kept = {-1, -1, -1}, .flags = pty ? P_PTY : 0};
    if (pty) { /* the master goes to the host with SPAWNED; kept too, or closed then */
        c.kept[0] = master;
        c.nkept = 1;
    }
    if (keep) {
        c.counted = 1;
        nkept_children++;
        c.desc = desc;
        c.desclen = rq->desclen;
        for (int i = 3; i < nfds; i++) c.kept[c.nkept++] = fds[i];
        if (flags & F_STDIN) c.flags |= P_STDIN;
    } else {
        for (int i = 3; i < nfds; i++) close_fd(&fds[i]);
    }
    children[nchildren++] = c;
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
    free(desc);
    send2(slot, gen, MSG_FAILED, id, stage, code);
}

/* A child not reaped yet (an exited one's pid may belong to another process by now). */
static struct child *find_child(pid_t pid) {
    for (size_t i = 0; i < nchildren; i++)
        if (children[i].pid == pid && !children[i].exited) return &children[i];
    return NULL;
}

/* A command this connection owns and that is not reaped yet (so its pid cannot have been recycled). */
static struct child *owned_child(int slot, uint32_t pid) {
    struct child *c = find_child((pid_t)pid);
    return c && c->slot == slot && c->gen == conns[slot].gen ? c : NULL;
}

/* SIGNAL: also to the process group, unless that is ours. */
static void signal_command(int slot, const struct signal_req *rq) {
    struct child *c = owned_child(slot, rq->pid);
    if (!c || rq->signum < 1 || rq->signum >= _NSIG) return;
    pid_t group = getpgid(c->pid);
    if (group > 1 && group != getpgrp()) kill(-group, (int)rq->signum);
    kill(c->pid, (int)rq->signum);
}

/* CLOSE_STDIN: the host closed its stdin end; ours must go too for the process to read EOF. */
static void close_stdin(int slot, const struct pid_req *rq) {
    struct child *c = owned_child(slot, rq->pid);
    if (!c || !(c->flags & P_STDIN)) return;
    close_fd(&c->kept[--c->nkept]); /* stdin is the last kept end */
    c->flags &= ~(uint32_t)P_STDIN;
}

/* ADOPT: every kept, started process whose owner is gone goes to this connection (an exited one
   is forgotten once handed over), then ADOPTED with the count. */
static void adopt(int slot, uint32_t id) {
    uint32_t gen = conns[slot].gen, count = 0;
    for (size_t i = 0; i < nchildren;) {
        struct child *c = &children[i];
        if (!c->started || !c->counted || owner_alive(c)) {
            i++;
            continue;
        }
        struct process_rec r = {{MSG_PROCESS, id}, (uint32_t)c->pid, c->flags | (c->exited ? P_EXITED : 0),
                                c->exited ? c->status : 0, c->desclen};
        send_parts(slot, gen, &r, sizeof r, c->desc, c->desclen, c->kept, c->nkept);
        if (conns[slot].fd < 0 || conns[slot].gen != gen) return; /* dropped: they stay orphans */
        count++;
        c->slot = slot;
        c->gen = gen;
        if (c->exited) forget(c); /* its place now holds another child: look at i again */
        else i++;
    }
    send2(slot, gen, MSG_ADOPTED, id, count, 0);
}

static void read_conn(int slot) {
    int fds[6], nfds = 0;
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
            if (nfds < 6) fds[nfds++] = fd;
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
    else if (h->type == MSG_CLOSE_STDIN && n == sizeof(struct pid_req)) close_stdin(slot, (const void *)request);
    else if (h->type == MSG_ADOPT && n == sizeof(struct header)) adopt(slot, h->id);
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
        send_msg(c->slot, c->gen, &r, sizeof r, (c->flags & P_PTY) ? c->kept[0] : -1);
        if (!c->counted) release(c); /* an unkept pty: the master was only for the host */
    } else {
        if (n == sizeof report) send2(c->slot, c->gen, MSG_FAILED, c->req, report[0], report[1]);
        else send2(c->slot, c->gen, MSG_FAILED, c->req, ST_EXEC, EIO);
        release(c);
    }
}

/* An orphan's exit is remembered (with its kept ends: output may be left in them), the oldest
   forgotten beyond MAX_EXITED. */
static void remember_exit(struct child *c, int status) {
    c->exited = 1;
    c->status = (uint32_t)status;
    c->exit_seq = ++exit_counter;
    if (++nexited <= MAX_EXITED) return;
    struct child *oldest = NULL;
    for (size_t i = 0; i < nchildren; i++)
        if (children[i].exited && (!oldest || children[i].exit_seq < oldest->exit_seq)) oldest = &children[i];
    forget(oldest);
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
        if (c->started && c->counted && !owner_alive(c)) {
            remember_exit(c, status);
            continue;
        }
        if (c->started) send2(c->slot, c->gen, MSG_EXIT, 0, (uint32_t)pid, (uint32_t)status);
        forget(c);
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
