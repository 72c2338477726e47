/*
 * uenvfs_spank.c: a Slurm SPANK plugin that starts every task of a job inside the uenv images
 * that the job's prolog acquired (`sbatch --comment=uenv=NAME`), each at the mount point it
 * was built for (usually /user-environment), with no wrapper in the job's command.
 *
 * For each task, in slurmstepd's child as root before the task becomes the user
 * (task_init_privileged):
 *
 *  1. Whether the job acquired images is decided without uenvfs: its journal
 *     (<statedir>/journal.json, root's, written before `uenvfs acquire` returns) names every
 *     allocation that acquired an image. A job whose allocation (slurm-<jobid>) is not there
 *     is left alone at once, whatever uenvfs does. A journal that cannot be read whole (bigger
 *     than JOURNAL_MAX, not root's, unreadable) decides nothing: uenvfs is asked.
 *  2. Otherwise the task gets a mount namespace of its own (every mount a slave of the host's,
 *     so nothing leaves it) and `uenvfs attach slurm-<jobid>` binds there each image the
 *     allocation acquired (it asks uenvfs's query socket); its output becomes the task's
 *     UENV_MOUNT_LIST. attach is killed if it has not finished within `timeout` seconds.
 *
 * The task fails, with one line in its stderr and in slurmd's log, if attach fails (its own
 * message says why), does not finish in time, or prints more than LIST_MAX bytes: nothing is
 * decided from a truncated read.
 *
 * Build:   cc -shared -fPIC -o uenvfs_spank.so uenvfs_spank.c   (Slurm's spank.h needed:
 *          Debian's libslurm-dev)
 * Install: in plugstack.conf,
 *          required /opt/uenvfs/lib/uenvfs_spank.so mountpoint=/run/pact/uenv uenvfs=/usr/local/bin/uenvfs
 * Options: mountpoint=DIR (default /run/pact/uenv), statedir=DIR (uenvfs's state_dir, default
 *          /run/pact/uenvfs), uenvfs=PATH (default uenvfs), timeout=SECONDS (default 10).
 */

#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <slurm/spank.h>

SPANK_PLUGIN(uenvfs, 1);

#define JOURNAL_MAX (64 << 20) /* bytes of journal read at most; a bigger one: ask uenvfs */
#define LIST_MAX 65536         /* bytes of UENV_MOUNT_LIST at most */
#define REAP_MS 1000           /* how long a killed attach may take to go */

static const char *mountpoint = "/run/pact/uenv";
static const char *statedir = "/run/pact/uenvfs";
static const char *uenvfs = "uenvfs";
static const char *timeout_text = "10";
static double timeout = 10.0;

static int read_options(int ac, char **av)
{
	for (int i = 0; i < ac; i++) {
		if (strncmp(av[i], "mountpoint=", 11) == 0)
			mountpoint = av[i] + 11;
		else if (strncmp(av[i], "statedir=", 9) == 0)
			statedir = av[i] + 9;
		else if (strncmp(av[i], "uenvfs=", 7) == 0)
			uenvfs = av[i] + 7;
		else if (strncmp(av[i], "timeout=", 8) == 0) {
			char *end;
			timeout_text = av[i] + 8;
			timeout = strtod(timeout_text, &end);
			if (end == timeout_text || *end != '\0' || !(timeout > 0 && timeout < 86400)) {
				slurm_error("uenvfs: timeout=%s: not a number of seconds", timeout_text);
				return -1;
			}
		} else {
			slurm_error("uenvfs: unknown plugin option '%s'", av[i]);
			return -1;
		}
	}
	return 0;
}

/* The task fails with this one line, in its stderr and in slurmd's log. */
static int fail(const char *format, ...) __attribute__((format(printf, 1, 2)));
static int fail(const char *format, ...)
{
	char line[1024];
	va_list args;
	va_start(args, format);
	vsnprintf(line, sizeof line, format, args);
	va_end(args);
	fprintf(stderr, "uenvfs: %s\n", line);
	fflush(stderr);
	slurm_error("uenvfs: %s", line);
	return -1;
}

enum listed { NOT_LISTED, LISTED, UNKNOWN };

/* Whether uenvfs's journal names *alloc* ("slurm-<id>", quotes included: no other id matches);
 * UNKNOWN if the journal cannot be read whole (*why* then says why). No journal: uenvfs never
 * ran with this state directory, and nothing was acquired. */
static enum listed journal_lists(const char *alloc, char *why, size_t why_size)
{
	char path[4096], needle[64];
	snprintf(path, sizeof path, "%s/journal.json", statedir);
	snprintf(needle, sizeof needle, "\"%s\"", alloc);
	int fd = open(path, O_RDONLY | O_CLOEXEC | O_NOFOLLOW | O_NONBLOCK);
	if (fd < 0) {
		if (errno == ENOENT)
			return NOT_LISTED;
		snprintf(why, why_size, "%s: %s", path, strerror(errno));
		return UNKNOWN;
	}
	struct stat st;
	if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode) || st.st_uid != 0
	    || (st.st_mode & 022) != 0) {
		snprintf(why, why_size, "%s is not a file of root's only", path);
		close(fd);
		return UNKNOWN;
	}
	if (st.st_size > JOURNAL_MAX) {
		snprintf(why, why_size, "%s has more than %d bytes", path, JOURNAL_MAX);
		close(fd);
		return UNKNOWN;
	}
	/* The journal is replaced by a rename, never written in place: what this descriptor
	 * reads is one whole journal. Read to its end, not to st_size. */
	char *text = malloc(JOURNAL_MAX + 1);
	size_t length = 0;
	ssize_t got = 0;
	while (text != NULL && length <= JOURNAL_MAX
	       && ((got = read(fd, text + length, JOURNAL_MAX + 1 - length)) > 0
		   || (got < 0 && errno == EINTR)))
		length += got > 0 ? (size_t)got : 0;
	int error = got < 0 ? errno : 0;
	close(fd);
	if (text == NULL || error != 0 || length > JOURNAL_MAX) {
		snprintf(why, why_size, "%s: %s", path,
			 text == NULL ? "no memory" : error ? strerror(error) : "too big");
		free(text);
		return UNKNOWN;
	}
	int found = memmem(text, length, needle, strlen(needle)) != NULL;
	free(text);
	return found ? LISTED : NOT_LISTED;
}

static double now(void)
{
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	return t.tv_sec + t.tv_nsec / 1e9;
}

/* Wait for *pid* until *deadline*; its exit code (128+N: killed by signal N), -1 if it has not
 * exited by then. */
static int wait_until(pid_t pid, double deadline)
{
	for (;;) {
		int status;
		pid_t done = waitpid(pid, &status, WNOHANG);
		if (done == pid)
			return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
		if (done < 0 && errno != EINTR)
			return -1;
		if (now() >= deadline)
			return -1;
		struct timespec pause = {0, 10 * 1000 * 1000};
		nanosleep(&pause, NULL);
	}
}

enum outcome { DONE, FAILED_TO_RUN, TOO_LATE, TOO_LONG };

/* Run `uenvfs attach` for *alloc* (in this process's mount namespace) within the timeout; its
 * output, without the newline, in *out*. *code* is its exit code when DONE. */
static enum outcome attach(const char *alloc, char *out, size_t size, int *code)
{
	char socket_path[4096];
	snprintf(socket_path, sizeof socket_path, "%s/socket", statedir);
	double deadline = now() + timeout;
	int pipe_fds[2];
	if (pipe2(pipe_fds, O_CLOEXEC) != 0)
		return FAILED_TO_RUN;
	pid_t pid = fork();
	if (pid < 0) {
		close(pipe_fds[0]);
		close(pipe_fds[1]);
		return FAILED_TO_RUN;
	}
	if (pid == 0) {
		dup2(pipe_fds[1], STDOUT_FILENO);
		execlp(uenvfs, uenvfs, "attach", "--mountpoint", mountpoint, "--socket",
		       socket_path, "--timeout", timeout_text, alloc, (char *)NULL);
		fprintf(stderr, "uenvfs: cannot run %s: %s\n", uenvfs, strerror(errno));
		_exit(127);
	}
	close(pipe_fds[1]);
	size_t length = 0;
	enum outcome outcome = DONE;
	for (;;) {
		double left = deadline - now();
		struct pollfd ready = {pipe_fds[0], POLLIN, 0};
		int polled = left > 0 ? poll(&ready, 1, (int)(left * 1000) + 1) : 0;
		if (polled < 0 && errno == EINTR)
			continue;
		if (polled <= 0) {
			outcome = TOO_LATE;
			break;
		}
		ssize_t got = read(pipe_fds[0], out + length, size - length);
		if (got < 0 && errno == EINTR)
			continue;
		if (got <= 0)
			break; /* the end of its output */
		length += (size_t)got;
		if (length == size) {
			outcome = TOO_LONG; /* never a list cut short */
			break;
		}
	}
	close(pipe_fds[0]);
	if (outcome == DONE) {
		*code = wait_until(pid, deadline);
		if (*code >= 0) {
			out[length] = '\0';
			out[strcspn(out, "\n")] = '\0';
			return DONE;
		}
		outcome = TOO_LATE;
	}
	kill(pid, SIGKILL);
	wait_until(pid, now() + REAP_MS / 1000.0); /* not forever: a zombie is init's then */
	return outcome;
}

int slurm_spank_task_init_privileged(spank_t sp, int ac, char **av)
{
	uint32_t job;
	char alloc[32], why[4200] = "", list[LIST_MAX + 1];
	if (read_options(ac, av) != 0)
		return -1;
	if (spank_get_item(sp, S_JOB_ID, &job) != ESPANK_SUCCESS)
		return 0;
	snprintf(alloc, sizeof alloc, "slurm-%u", job);
	enum listed listed = journal_lists(alloc, why, sizeof why);
	if (listed == NOT_LISTED)
		return 0;
	const char *needs = listed == LISTED ? "needs images" : "may need images";
	if (listed == LISTED)
		snprintf(why, sizeof why, "%s acquired them", alloc);
	else
		slurm_info("uenvfs: %s: asking uenvfs, the journal decides nothing: %s", alloc, why);
	if (unshare(CLONE_NEWNS) != 0)
		return fail("%s: cannot make a mount namespace: %s", alloc, strerror(errno));
	if (mount("none", "/", NULL, MS_REC | MS_SLAVE, NULL) != 0)
		return fail("%s: cannot make the mount namespace a slave: %s", alloc,
			    strerror(errno));
	int code = 0;
	switch (attach(alloc, list, LIST_MAX, &code)) {
	case DONE:
		break;
	case FAILED_TO_RUN:
		return fail("%s: cannot run %s attach: %s", alloc, uenvfs, strerror(errno));
	case TOO_LATE:
		return fail("uenvfs did not answer within %s s: job %u %s (%s); its task does "
			    "not start", timeout_text, job, needs, why);
	case TOO_LONG:
		return fail("%s: uenvfs attach printed more than %d bytes", alloc, LIST_MAX);
	}
	if (code != 0)
		return fail("%s: uenvfs attach failed (exit %d; the line above says why)", alloc,
			    code);
	if (list[0] != '\0' && spank_setenv(sp, "UENV_MOUNT_LIST", list, 1) != ESPANK_SUCCESS)
		return fail("%s: cannot set UENV_MOUNT_LIST", alloc);
	return 0;
}
