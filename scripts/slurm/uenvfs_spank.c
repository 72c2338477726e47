/*
 * uenvfs_spank.c: a Slurm SPANK plugin that starts every task of a job inside its uenv images,
 * each at its mount point, with no wrapper in the job's command. It takes uenv's own options,
 * as uenv's plugin ("uenv-mount") does, so that a uenv user's job script runs unchanged:
 *
 *   --uenv=IMAGE[:MOUNT][,...]   IMAGE: a uenv label, an image name, or the path of an image
 *                                file that uenvfs serves; default SLURM_UENV
 *   --view=[IMAGE:]VIEW[,...]    views to apply; default SLURM_UENV_VIEW
 *
 * or the images that the job's prolog acquired from its comment (`--comment=uenv=NAME`).
 *
 *  1. On the submit host (srun, sbatch, salloc): a syntax check only (there may be no uenvfs
 *     there); the images go to the job's prolog in its control environment (UENVFS_UENV). The
 *     option values reach the tasks through Slurm, SLURM_UENV and SLURM_UENV_VIEW through the
 *     job's environment.
 *  2. In the job's prolog (root, on the node): `uenvfs attach --acquire UID --uenv IMAGES
 *     slurm-<jobid>` acquires the images for the job's allocation, until the epilog releases
 *     it (`uenvfs release slurm-<jobid>`). Neither ever fails (that would drain the node): a
 *     task of the job then fails, saying why.
 *  3. Once per step and node, in slurmstepd (root) before it starts any task
 *     (init_post_opt, remote context): slurmstepd gets a mount namespace of its own (every
 *     mount a slave of the host's, so nothing leaves it), which every task of the step, forked
 *     from it afterwards, inherits; one `uenvfs attach`, slurmstepd's child, binds the images
 *     there (as uenv's plugin mounts its images in slurmstepd):
 *     - with images: `uenvfs attach --uenv IMAGES --view VIEWS slurm-<jobid>` reads the step's
 *       environment (the job's: spank_getenv's) on stdin, binds the images, and prints the
 *       changes to that environment (NAME=VALUE to set, NAME to unset, each ended by a NUL),
 *       which are applied with spank_setenv and spank_unsetenv: every task's environment is
 *       made from it. Views that the step's UENV_VIEW lists already (an srun inside the batch
 *       script, whose environment is the batch script's) are not applied again;
 *     - else, whether the job acquired images is decided without uenvfs: its journal
 *       (<statedir>/journal.json, root's, written before `uenvfs acquire` returns) names every
 *       allocation that acquired an image. A job whose allocation (slurm-<jobid>) is not there
 *       is left alone at once, whatever uenvfs does. A journal that cannot be read whole
 *       (bigger than JOURNAL_MAX, not root's, unreadable) decides nothing: uenvfs is asked.
 *       `uenvfs attach slurm-<jobid>` binds each image the allocation acquired; its output
 *       becomes the step's UENV_MOUNT_LIST.
 *     attach is killed if it has not finished within `timeout` seconds.
 *  4. For each task (task_init_privileged, in slurmstepd's child, whose stderr is the task's):
 *     if the step could not be set up, the task fails; the node's first task of the step says
 *     why, with one line.
 *
 * The step's tasks fail, with one line in the job's stderr and in slurmd's log, if attach
 * fails (the line is its message: an unknown or ambiguous label, an unknown view, a missing
 * mount point, two images at one mount point, ...), does not finish in time, or prints more
 * than OUTPUT_MAX bytes: nothing is decided from a truncated read. init_post_opt itself never
 * fails: its failure in a batch step drains the node and requeues the job (slurmctld takes
 * it for the node's), and its message would reach no output of the job.
 *
 * Build:   cc -shared -fPIC -o uenvfs_spank.so uenvfs_spank.c   (Slurm's spank.h needed:
 *          Debian's libslurm-dev)
 * Install: in plugstack.conf (instead of uenv's plugin: both take --uenv and --view),
 *          required /opt/uenvfs/lib/uenvfs_spank.so mountpoint=/run/pact/uenv uenvfs=/usr/local/bin/uenvfs
 * Options: mountpoint=DIR (default /run/pact/uenv), statedir=DIR (uenvfs's state_dir, default
 *          /run/pact/uenvfs), uenvfs=PATH (default uenvfs), timeout=SECONDS (default 10).
 */

#define _GNU_SOURCE
#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <slurm/spank.h>

SPANK_PLUGIN(uenvfs, 1);

#define JOURNAL_MAX (64 << 20) /* bytes of journal read at most; a bigger one: ask uenvfs */
#define OUTPUT_MAX (1 << 20)   /* bytes of attach's output at most */
#define MESSAGE_MAX 4096       /* bytes of attach's error message shown */
#define REAP_MS 1000           /* how long a killed attach may take to go */
#define SCRIPT_SECONDS 120.0   /* how long attach --acquire and release may take */
#define CONTROL_VARIABLE "UENVFS_UENV" /* the images, for the prolog (as SPANK_UENVFS_UENV) */

static const char *mountpoint = "/run/pact/uenv";
static const char *statedir = "/run/pact/uenvfs";
static const char *uenvfs = "uenvfs";
static const char *timeout_text = "10";
static double timeout = 10.0;

static char *uenv_option;  /* --uenv's value, if given */
static char *view_option;  /* --view's */

/* In slurmstepd: what setting the step up on this node gave its tasks (init_post_opt writes
 * them, task_init_privileged reads them): the line that fails them (empty if none), and what
 * attach said on the way (an image bound through uenvfs instead), for the first task to say. */
static char step_failure[MESSAGE_MAX + 256];
static char *step_note;

static int remember(char **where, const char *value)
{
	free(*where);
	*where = value ? strdup(value) : NULL;
	return ESPANK_SUCCESS;
}

static int take_uenv(int val, const char *optarg, int remote)
{
	(void)val, (void)remote;
	return remember(&uenv_option, optarg);
}

static int take_view(int val, const char *optarg, int remote)
{
	(void)val, (void)remote;
	return remember(&view_option, optarg);
}

static struct spank_option uenv_arg = {
	"uenv", "<label|file>[:mount-point][,...]",
	"uenv images to mount (uenvfs): a label, an image name or a file, each at its mount point "
	"(default: its meta/env.json's, else /user-environment)", 1, 0, take_uenv};
static struct spank_option view_arg = {
	"view", "[uenv:]view-name[,...]", "uenv views to apply (uenvfs)", 1, 0, take_view};

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

/* The submission (on the submit side) or the step's tasks (in slurmstepd) fail with this one
 * line: in the submitter's stderr, or kept for the tasks to say (step_failure) and in slurmd's
 * log (at level info: at level error, slurmstepd would copy it to a task's stderr too). */
static int fail(const char *format, ...) __attribute__((format(printf, 1, 2)));
static int fail(const char *format, ...)
{
	char line[MESSAGE_MAX + 256];
	va_list args;
	va_start(args, format);
	vsnprintf(line, sizeof line, format, args);
	va_end(args);
	if (spank_context() == S_CTX_REMOTE) {
		snprintf(step_failure, sizeof step_failure, "%s", line);
	} else {
		fprintf(stderr, "uenvfs: %s\n", line);
		fflush(stderr);
	}
	slurm_info("uenvfs: %s", line);
	return -1;
}

int slurm_spank_init(spank_t sp, int ac, char **av)
{
	if (read_options(ac, av) != 0)
		return -1;
	if (spank_context() == S_CTX_SLURMD || spank_context() == S_CTX_JOB_SCRIPT)
		return 0;
	if (spank_option_register(sp, &uenv_arg) != ESPANK_SUCCESS
	    || spank_option_register(sp, &view_arg) != ESPANK_SUCCESS)
		return -1;
	return 0;
}

/* Whether *text* is a list of non-empty words of printable characters, separated by commas;
 * else why not, in *why*. uenvfs on the node checks the rest. */
static int well_formed(const char *text, char *why, size_t size)
{
	size_t length = strlen(text);
	if (length == 0) {
		snprintf(why, size, "it is empty");
		return 0;
	}
	for (size_t i = 0; i < length; i++) {
		unsigned char c = (unsigned char)text[i];
		if (c < 0x20 || c == 0x7f || c == ' ') {
			snprintf(why, size, "unexpected character 0x%02x", c);
			return 0;
		}
		if (c == ',' && (i == 0 || i + 1 == length || text[i + 1] == ',')) {
			snprintf(why, size, "an empty item");
			return 0;
		}
	}
	return 1;
}

/* The submit side (srun, sbatch, salloc): check the syntax, hand the images to the prolog. */
static int check_submission(spank_t sp)
{
	const char *images = uenv_option ? uenv_option : getenv("SLURM_UENV");
	const char *views = view_option ? view_option : getenv("SLURM_UENV_VIEW");
	char why[128];
	if (images == NULL) {
		if (views != NULL)
			return fail("--view=%s is given, but --uenv is not", views);
		return 0;
	}
	if (!well_formed(images, why, sizeof why))
		return fail("invalid uenv description '%s': %s", images, why);
	if (views != NULL && !well_formed(views, why, sizeof why))
		return fail("invalid view description '%s': %s", views, why);
	/* Only a new allocation has a control environment: for a step, its prolog ran. */
	spank_job_control_setenv(sp, CONTROL_VARIABLE, images, 1);
	return 0;
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
		struct timespec pause = {0, 5 * 1000 * 1000};
		nanosleep(&pause, NULL);
	}
}

/* What a run of uenvfs gave: its output and its error output (NUL-terminated, *out_length*
 * bytes of output), its exit code. */
struct result {
	char *out, *err;
	size_t out_length;
	int code;
};

enum outcome { DONE, FAILED_TO_RUN, TOO_LATE, TOO_LONG };

/* The content of the memory file *fd* (at most *max* bytes, else NULL), NUL-terminated. */
static char *contents(int fd, size_t max, size_t *length)
{
	struct stat st;
	if (fstat(fd, &st) != 0 || (size_t)st.st_size > max)
		return NULL;
	char *text = malloc((size_t)st.st_size + 1);
	if (text == NULL)
		return NULL;
	ssize_t got = pread(fd, text, (size_t)st.st_size, 0);
	*length = got > 0 ? (size_t)got : 0;
	text[*length] = '\0';
	return text;
}

/* This process's environment with SLURM_JOB_ID=*job* (uenvfs counts the uses of a process of
 * root's for the allocation its environment names), malloc'd. */
static char **environment_for(uint32_t job)
{
	extern char **environ;
	size_t count = 0;
	for (char **entry = environ; *entry; entry++)
		count++;
	char **env = calloc(count + 2, sizeof *env), **at = env;
	static char id[32];
	if (env == NULL)
		return NULL;
	snprintf(id, sizeof id, "SLURM_JOB_ID=%u", job);
	*at++ = id;
	for (char **entry = environ; *entry; entry++)
		if (strncmp(*entry, "SLURM_JOB_ID=", 13) != 0)
			*at++ = *entry;
	return env;
}

/* Run *argv* (the uenvfs command) with *input* (*input_length* bytes) on its stdin within
 * *seconds*, for *job*. Its output and error output go to memory files: nothing waits on a
 * pipe. */
static enum outcome run(char *const argv[], uint32_t job, const char *input,
			size_t input_length, double seconds, struct result *result)
{
	double deadline = now() + seconds;
	int fds[3] = {memfd_create("uenvfs-in", MFD_CLOEXEC),
		      memfd_create("uenvfs-out", MFD_CLOEXEC),
		      memfd_create("uenvfs-err", MFD_CLOEXEC)};
	char **env = environment_for(job);
	enum outcome outcome = FAILED_TO_RUN;
	memset(result, 0, sizeof *result);
	if (env == NULL || fds[0] < 0 || fds[1] < 0 || fds[2] < 0
	    || (input_length && write(fds[0], input, input_length) != (ssize_t)input_length)
	    || lseek(fds[0], 0, SEEK_SET) != 0)
		goto done;
	pid_t pid = fork();
	if (pid < 0)
		goto done;
	if (pid == 0) {
		for (int i = 0; i < 3; i++)
			dup2(fds[i], i); /* stdin, stdout, stderr */
		execvpe(argv[0], argv, env);
		dprintf(STDERR_FILENO, "cannot run %s: %s\n", argv[0], strerror(errno));
		_exit(127);
	}
	result->code = wait_until(pid, deadline);
	if (result->code < 0) {
		kill(pid, SIGKILL);
		wait_until(pid, now() + REAP_MS / 1000.0); /* not forever: a zombie is init's then */
		outcome = TOO_LATE;
		goto done;
	}
	size_t err_length;
	result->out = contents(fds[1], OUTPUT_MAX, &result->out_length);
	result->err = contents(fds[2], OUTPUT_MAX, &err_length);
	outcome = result->out == NULL || result->err == NULL ? TOO_LONG : DONE;
done:
	for (int i = 0; i < 3; i++)
		if (fds[i] >= 0)
			close(fds[i]);
	free(env);
	return outcome;
}

static void forget(struct result *result)
{
	free(result->out);
	free(result->err);
}

/* The last line of *text* (its message), without uenvfs's "uenvfs attach: ". */
static const char *last_line(char *text)
{
	size_t length = strlen(text);
	while (length > 0 && isspace((unsigned char)text[length - 1]))
		text[--length] = '\0';
	char *line = strrchr(text, '\n');
	line = line ? line + 1 : text;
	const char *prefix = "uenvfs attach: ";
	if (strncmp(line, prefix, strlen(prefix)) == 0)
		line += strlen(prefix);
	if (strlen(line) > MESSAGE_MAX)
		line[MESSAGE_MAX] = '\0';
	return *line ? line : "no message";
}

/* The value of *name* in the environment *env*, NULL if it has none. */
static const char *lookup(char **env, const char *name)
{
	size_t length = strlen(name);
	for (char **entry = env; entry && *entry; entry++)
		if (strncmp(*entry, name, length) == 0 && (*entry)[length] == '=')
			return *entry + length + 1;
	return NULL;
}

/* The environment *env* as NAME=VALUE entries, each ended by a NUL (malloc'd). */
static char *flatten(char **env, size_t *length)
{
	size_t size = 1;
	for (char **entry = env; entry && *entry; entry++)
		size += strlen(*entry) + 1;
	char *flat = malloc(size), *at = flat;
	if (flat == NULL)
		return NULL;
	for (char **entry = env; entry && *entry; entry++)
		at = stpcpy(at, *entry) + 1;
	*length = (size_t)(at - flat);
	return flat;
}

/* Apply attach's output (NAME=VALUE to set, NAME to unset, each ended by a NUL). */
static int apply(spank_t sp, const char *changes, size_t length, const char *alloc)
{
	for (const char *entry = changes; entry < changes + length; entry += strlen(entry) + 1) {
		char *equals = strchr(entry, '=');
		if (equals == NULL) {
			if (spank_unsetenv(sp, entry) != ESPANK_SUCCESS)
				return fail("%s: cannot unset %s", alloc, entry);
			continue;
		}
		char *name = strndup(entry, (size_t)(equals - entry));
		spank_err_t done = name ? spank_setenv(sp, name, equals + 1, 1) : ESPANK_ERROR;
		free(name);
		if (done != ESPANK_SUCCESS)
			return fail("%s: cannot set %.*s", alloc, (int)(equals - entry), entry);
	}
	return 0;
}

/* Check how a run of attach went: 0, or the task fails with one line. */
static int judge(enum outcome outcome, struct result *result, uint32_t job, const char *needs,
		 const char *why)
{
	switch (outcome) {
	case DONE:
		break;
	case FAILED_TO_RUN:
		return fail("slurm-%u: cannot run %s attach: %s", job, uenvfs, strerror(errno));
	case TOO_LATE:
		return fail("uenvfs did not answer within %s s: job %u %s (%s); its task does "
			    "not start", timeout_text, job, needs, why);
	case TOO_LONG:
		return fail("slurm-%u: uenvfs attach printed more than %d bytes", job, OUTPUT_MAX);
	}
	if (result->code != 0)
		return fail("%s", last_line(result->err));
	if (result->err[0] != '\0') { /* what it said on the way (an image bound through uenvfs) */
		free(step_note);
		step_note = strdup(result->err);
	}
	return 0;
}

/* Give slurmstepd a mount namespace of its own, every mount in it a slave of the host's (so
 * that nothing mounted in it leaves it), for attach (its child) to bind the images in and
 * the step's tasks (forked later) to inherit. */
static int own_namespace(const char *alloc)
{
	if (unshare(CLONE_NEWNS) != 0)
		return fail("%s: cannot make a mount namespace: %s", alloc, strerror(errno));
	if (mount("none", "/", NULL, MS_REC | MS_SLAVE, NULL) != 0)
		return fail("%s: cannot make the mount namespace a slave: %s", alloc,
			    strerror(errno));
	return 0;
}

/* uenv's options: attach binds the images and says how the step's environment changes. */
static int attach_uenv(spank_t sp, uint32_t job, const char *images, const char *views,
		       char **env)
{
	char alloc[32], socket_path[4096], why[4200];
	snprintf(alloc, sizeof alloc, "slurm-%u", job);
	snprintf(socket_path, sizeof socket_path, "%s/socket", statedir);
	snprintf(why, sizeof why, "--uenv=%s", images);
	size_t input_length = 0;
	char *input = flatten(env, &input_length);
	if (input == NULL)
		return fail("%s: no memory", alloc);
	if (own_namespace(alloc) != 0) {
		free(input);
		return -1;
	}
	char *argv[16] = {(char *)uenvfs, "attach", "--mountpoint", (char *)mountpoint,
			  "--socket", socket_path, "--timeout", (char *)timeout_text, "--uenv",
			  (char *)images};
	int argc = 10;
	if (views != NULL) {
		argv[argc++] = "--view";
		argv[argc++] = (char *)views;
	}
	argv[argc++] = "--";
	argv[argc++] = alloc;
	argv[argc] = NULL;
	struct result result;
	enum outcome outcome = run(argv, job, input, input_length, timeout, &result);
	free(input);
	int rc = judge(outcome, &result, job, "needs images", why);
	if (rc == 0)
		rc = apply(sp, result.out, result.out_length, alloc);
	forget(&result);
	return rc;
}

/* The comment form: the images that the job's allocation acquired, if any. */
static int attach_acquired(spank_t sp, uint32_t job)
{
	char alloc[32], socket_path[4096], why[4200] = "";
	snprintf(alloc, sizeof alloc, "slurm-%u", job);
	snprintf(socket_path, sizeof socket_path, "%s/socket", statedir);
	enum listed listed = journal_lists(alloc, why, sizeof why);
	if (listed == NOT_LISTED)
		return 0;
	const char *needs = listed == LISTED ? "needs images" : "may need images";
	if (listed == LISTED)
		snprintf(why, sizeof why, "%s acquired them", alloc);
	else
		slurm_info("uenvfs: %s: asking uenvfs, the journal decides nothing: %s", alloc, why);
	if (own_namespace(alloc) != 0)
		return -1;
	char *argv[] = {(char *)uenvfs, "attach", "--mountpoint", (char *)mountpoint, "--socket",
			socket_path, "--timeout", (char *)timeout_text, "--", alloc, NULL};
	struct result result;
	int rc = judge(run(argv, job, NULL, 0, timeout, &result), &result, job, needs, why);
	if (rc == 0) {
		result.out[strcspn(result.out, "\n")] = '\0';
		if (result.out[0] != '\0'
		    && spank_setenv(sp, "UENV_MOUNT_LIST", result.out, 1) != ESPANK_SUCCESS)
			rc = fail("%s: cannot set UENV_MOUNT_LIST", alloc);
	}
	forget(&result);
	return rc;
}

/* Set the step up on this node, in slurmstepd before it forks any task: 3. at the top. A
 * failure is kept in step_failure, for the tasks. */
static void set_up_step(spank_t sp)
{
	uint32_t job;
	char **env = NULL;
	if (spank_get_item(sp, S_JOB_ID, &job) != ESPANK_SUCCESS)
		return;
	if (spank_get_item(sp, S_JOB_ENV, &env) != ESPANK_SUCCESS)
		env = NULL;
	const char *images = uenv_option ? uenv_option : lookup(env, "SLURM_UENV");
	const char *views = view_option ? view_option : lookup(env, "SLURM_UENV_VIEW");
	if (images == NULL) {
		if (views != NULL)
			fail("--view=%s is given, but --uenv is not", views);
		else
			attach_acquired(sp, job);
		return;
	}
	attach_uenv(sp, job, images, views, env);
}

int slurm_spank_init_post_opt(spank_t sp, int ac, char **av)
{
	(void)ac, (void)av;
	switch (spank_context()) {
	case S_CTX_LOCAL:
	case S_CTX_ALLOCATOR:
		return check_submission(sp);
	case S_CTX_REMOTE:
		set_up_step(sp);
		return 0; /* never fails: its tasks do (see the top) */
	default:
		return 0;
	}
}

/* Each task: fails if the step could not be set up; the node's first task says why. */
int slurm_spank_task_init_privileged(spank_t sp, int ac, char **av)
{
	(void)ac, (void)av;
	int task;
	if (spank_get_item(sp, S_TASK_ID, &task) != ESPANK_SUCCESS)
		task = 0;
	if (task == 0 && step_failure[0] != '\0')
		fprintf(stderr, "uenvfs: %s\n", step_failure);
	else if (task == 0 && step_note != NULL)
		fputs(step_note, stderr);
	fflush(stderr);
	return step_failure[0] != '\0' ? -1 : 0;
}

/* The prolog and epilog: never fail (that drains the node); a task says what went wrong. */
static void script(const char *what, char *const argv[], uint32_t job)
{
	struct result result;
	enum outcome outcome = run(argv, job, NULL, 0, SCRIPT_SECONDS, &result);
	if (outcome == DONE && result.code == 0)
		slurm_info("uenvfs: %s slurm-%u", what, job);
	else if (outcome == DONE)
		slurm_error("uenvfs: job %u: %s failed (exit %d): %s", job, what, result.code,
			    last_line(result.err));
	else
		slurm_error("uenvfs: job %u: %s did not finish within %g s", job, what,
			    SCRIPT_SECONDS);
	forget(&result);
}

int slurm_spank_job_prolog(spank_t sp, int ac, char **av)
{
	uint32_t job;
	uid_t uid;
	const char *images = getenv("SPANK_" CONTROL_VARIABLE);
	if (read_options(ac, av) != 0 || images == NULL
	    || spank_get_item(sp, S_JOB_ID, &job) != ESPANK_SUCCESS
	    || spank_get_item(sp, S_JOB_UID, &uid) != ESPANK_SUCCESS)
		return 0;
	char alloc[32], owner[16];
	snprintf(alloc, sizeof alloc, "slurm-%u", job);
	snprintf(owner, sizeof owner, "%u", (unsigned)uid);
	char *argv[] = {(char *)uenvfs, "attach", "--mountpoint", (char *)mountpoint, "--acquire",
			owner, "--uenv", (char *)images, "--", alloc, NULL};
	script("acquired the images of --uenv for", argv, job);
	return 0;
}

int slurm_spank_job_epilog(spank_t sp, int ac, char **av)
{
	uint32_t job;
	char alloc[32], why[4200];
	if (read_options(ac, av) != 0 || getenv("SPANK_" CONTROL_VARIABLE) == NULL
	    || spank_get_item(sp, S_JOB_ID, &job) != ESPANK_SUCCESS)
		return 0;
	snprintf(alloc, sizeof alloc, "slurm-%u", job);
	if (journal_lists(alloc, why, sizeof why) == NOT_LISTED)
		return 0; /* released already (by the Epilog script), or nothing acquired */
	char *argv[] = {(char *)uenvfs, "release", "--mountpoint", (char *)mountpoint, "--",
			alloc, NULL};
	script("released", argv, job);
	return 0;
}
