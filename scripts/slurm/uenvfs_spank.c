/*
 * uenvfs_spank.c: a Slurm SPANK plugin that starts every task of a job inside the uenv images
 * that the job's prolog acquired (`sbatch --comment=uenv=NAME`), each at the mount point it
 * was built for (usually /user-environment), with no wrapper in the job's command.
 *
 * For each task, in slurmstepd's child as root before the task becomes the user
 * (task_init_privileged): if uenvfs's .status names the job's allocation (slurm-<jobid>), the
 * task gets a mount namespace of its own (every mount a slave of the host's, so nothing
 * leaves it) and `uenvfs attach slurm-<jobid>` binds there each image the allocation
 * acquired; its output becomes the task's UENV_MOUNT_LIST. A job that acquired nothing is
 * left alone. If attach fails, the task fails with attach's message in its stderr.
 *
 * Build:   cc -shared -fPIC -o uenvfs_spank.so uenvfs_spank.c   (Slurm's spank.h needed:
 *          Debian's libslurm-dev)
 * Install: in plugstack.conf,
 *          required /opt/uenvfs/lib/uenvfs_spank.so mountpoint=/run/pact/uenv uenvfs=/usr/local/bin/uenvfs
 */

#define _GNU_SOURCE
#include <errno.h>
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#include <slurm/spank.h>

SPANK_PLUGIN(uenvfs, 1);

#define STATUS_MAX (16 << 20) /* bytes of .status read at most */
#define LIST_MAX 65536        /* bytes of UENV_MOUNT_LIST at most */

static const char *mountpoint = "/run/pact/uenv";
static const char *uenvfs = "uenvfs";

static int read_options(int ac, char **av)
{
	for (int i = 0; i < ac; i++) {
		if (strncmp(av[i], "mountpoint=", 11) == 0)
			mountpoint = av[i] + 11;
		else if (strncmp(av[i], "uenvfs=", 7) == 0)
			uenvfs = av[i] + 7;
		else {
			slurm_error("uenvfs: unknown plugin option '%s'", av[i]);
			return -1;
		}
	}
	return 0;
}

/* Whether uenvfs's .status names *alloc*: a cheap test before anything is changed. */
static int named_in_status(const char *alloc)
{
	char path[4096], needle[64];
	snprintf(path, sizeof path, "%s/.status", mountpoint);
	snprintf(needle, sizeof needle, "\"%s\"", alloc);
	FILE *file = fopen(path, "r");
	if (file == NULL)
		return 0; /* no uenvfs here: nothing to do (the prolog says so if it matters) */
	char *text = malloc(STATUS_MAX + 1);
	size_t length = text ? fread(text, 1, STATUS_MAX, file) : 0;
	fclose(file);
	if (text == NULL)
		return 0;
	text[length] = '\0';
	int found = strstr(text, needle) != NULL;
	free(text);
	return found;
}

/* Run `uenvfs attach --mountpoint MP ALLOC` (in this process's mount namespace); its output,
 * without the newline, in *out*. Returns its exit code, or -1 if it could not run. */
static int attach(const char *alloc, char *out, size_t size)
{
	int pipe_fds[2];
	if (pipe(pipe_fds) != 0)
		return -1;
	pid_t pid = fork();
	if (pid < 0)
		return -1;
	if (pid == 0) {
		dup2(pipe_fds[1], STDOUT_FILENO);
		close(pipe_fds[0]);
		close(pipe_fds[1]);
		execlp(uenvfs, uenvfs, "attach", "--mountpoint", mountpoint, alloc, (char *)NULL);
		fprintf(stderr, "uenvfs: cannot run %s: %s\n", uenvfs, strerror(errno));
		_exit(127);
	}
	close(pipe_fds[1]);
	size_t length = 0;
	ssize_t got;
	while ((got = read(pipe_fds[0], out + length, size - 1 - length)) > 0
	       || (got < 0 && errno == EINTR))
		length += got > 0 ? (size_t)got : 0;
	close(pipe_fds[0]);
	out[length] = '\0';
	out[strcspn(out, "\n")] = '\0';
	int status;
	while (waitpid(pid, &status, 0) < 0)
		if (errno != EINTR)
			return -1;
	return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}

int slurm_spank_task_init_privileged(spank_t sp, int ac, char **av)
{
	uint32_t job;
	char alloc[32], list[LIST_MAX];
	if (read_options(ac, av) != 0)
		return -1;
	if (spank_get_item(sp, S_JOB_ID, &job) != ESPANK_SUCCESS)
		return 0;
	snprintf(alloc, sizeof alloc, "slurm-%u", job);
	if (!named_in_status(alloc))
		return 0;
	if (unshare(CLONE_NEWNS) != 0) {
		slurm_error("uenvfs: %s: cannot make a mount namespace: %m", alloc);
		return -1;
	}
	if (mount("none", "/", NULL, MS_REC | MS_SLAVE, NULL) != 0) {
		slurm_error("uenvfs: %s: cannot make the mount namespace a slave: %m", alloc);
		return -1;
	}
	int code = attach(alloc, list, sizeof list);
	if (code != 0) {
		slurm_error("uenvfs: %s: uenvfs attach failed (exit %d; the task's stderr says why)",
			    alloc, code);
		return -1;
	}
	if (list[0] != '\0' && spank_setenv(sp, "UENV_MOUNT_LIST", list, 1) != ESPANK_SUCCESS) {
		slurm_error("uenvfs: %s: cannot set UENV_MOUNT_LIST", alloc);
		return -1;
	}
	return 0;
}
