/*
 * test_main.c - runner of the C core's tests.
 *
 *   test_core [--seed=N] [--long] [FILTER...]
 *
 * Runs every test whose name contains one of the FILTER substrings (all
 * tests when none is given), prints one line per test ("name ... ok" or
 * "name ... FAIL" after the failure's message) and ends with the line
 * "N passed, M failed".  The exit status is 0 only when nothing failed, so
 * make and CI need no output parsing.  Memory errors and undefined
 * behaviour abort the process under the sanitizers, which also fails CI.
 *
 * --seed changes the random soak's seed (the default is fixed, so CI runs
 * are reproducible); --long runs the soak ten times longer.
 */
#include <stdarg.h>
#include <stdlib.h>

#include "harness.h"

/*
 * Options the sanitizer runtime reads at start-up, so the binary behaves
 * the same run by make or by hand (ASAN_OPTIONS in the environment still
 * overrides them).  allocator_may_return_null: a huge allocation returns
 * NULL, as from libc, so the core's HKV_ENOMEM paths can be tested.  In a
 * build without ASan this is an unused function.
 */
const char *__asan_default_options(void);
const char *__asan_default_options(void)
{
    return "detect_leaks=1:allocator_may_return_null=1";
}

int hkv_test_failed;
uint64_t hkv_test_seed = 20240611;
int hkv_test_scale = 1;

static int passed, failed;
static int num_filters;
static char **filters;
static const char *current;

void test_fail(const char *file, int line, const char *fmt, ...)
{
    /* The first failure says what went wrong; later ones of the same test
     * (a helper's failure reported again by its caller) add only where. */
    if (hkv_test_failed++ == 0) {
        va_list ap;
        fprintf(stdout, "\n    %s:%d: ", file, line);
        va_start(ap, fmt);
        vfprintf(stdout, fmt, ap);
        va_end(ap);
        fputc('\n', stdout);
    } else {
        fprintf(stdout, "    (from %s:%d)\n", file, line);
    }
    fflush(stdout);
}

static int selected(const char *name)
{
    if (num_filters == 0)
        return 1;
    for (int i = 0; i < num_filters; i++)
        if (strstr(name, filters[i]) != NULL)
            return 1;
    return 0;
}

void test_run(const char *name, void (*fn)(void))
{
    if (!selected(name))
        return;
    current = name;
    hkv_test_failed = 0;
    hkv_clear_error();
    /* Print the name first: if the test crashes, the log says which. */
    printf("%s ... ", name);
    fflush(stdout);
    fn();
    if (hkv_test_failed) {
        printf("%s ... FAIL\n", name);
        failed++;
    } else {
        printf("ok\n");
        passed++;
    }
    fflush(stdout);
    current = NULL;
}

int main(int argc, char **argv)
{
    filters = calloc((size_t)argc, sizeof *filters);
    if (filters == NULL)
        return 2;
    for (int i = 1; i < argc; i++) {
        if (strncmp(argv[i], "--seed=", 7) == 0)
            hkv_test_seed = strtoull(argv[i] + 7, NULL, 0);
        else if (strcmp(argv[i], "--long") == 0)
            hkv_test_scale = 10;
        else
            filters[num_filters++] = argv[i];
    }
    setvbuf(stdout, NULL, _IOLBF, 0);

    run_pool_index_tests();
    run_filter_tests();
    run_cache_tests();
    run_strip_tests();
    run_soak_tests();
    run_async_tests();
    run_events_tests();
    run_disk_tests();

    printf("%d passed, %d failed\n", passed, failed);
    free(filters);
    return failed == 0 && passed > 0 ? 0 : 1;
}
