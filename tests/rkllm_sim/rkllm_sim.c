/*
 * A stand-in librkllmrt.so: the RKLLM C ABI of one runtime version (RKLLM_ABI,
 * see rkllm_abi.h) with no NPU and no neural network behind it.
 *
 * The "model" is a text file written by the tests (magic, sizes, one hex piece
 * per token). Generation is a deterministic function of the last tokens in the
 * KV cache (greedy) or of that and a random number (sampling), delivered by
 * callbacks from a worker thread, as the runtime does. It records what it
 * received (rkllm_sim_record) so tests can check the marshalling, and injects
 * faults from environment variables:
 *   RKLLM_SIM_FAIL_INIT=1        rkllm_init fails
 *   RKLLM_SIM_ERROR_AFTER=N      an ERROR callback after N generated tokens
 *   RKLLM_SIM_EOS_AFTER=N        the model ends its answer after N tokens
 *   RKLLM_SIM_SCRIPT=a,b,c       the first generated tokens are these ids
 *   RKLLM_SIM_RAW_PIECES=1       each callback carries its own token's bytes, even a
 *                                partial UTF-8 character (state WAITING), instead of
 *                                the runtime's buffered whole characters
 *   RKLLM_SIM_TOKEN_US=N         microseconds per generated token, and a quarter of that per prompt
 *                                token (default 1000: an NPU-like pace of 1000 tokens/s)
 */
#include "rkllm_abi.h"

#include <errno.h>
#include <math.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>

#ifndef SIM_VERSION
#define SIM_VERSION "0.0.0"
#endif

#ifndef SIM_NO_BANNER
/* The real runtime logs "rkllm-runtime version: X"; the string is in the file, where llamacompat looks. */
__attribute__((used)) const char rkllm_sim_banner[] = "rkllm-runtime version: " SIM_VERSION " (llamacompat simulator)";
#endif

#define RECORD_SIZE 65536
#define WINDOW 8

typedef struct {
    int n_vocab, eos_id, n_embd, max_context;
    unsigned char **pieces;
    int *piece_len;
    int *candidates;
    int n_candidates;
} SimModel;

typedef struct {
    RKLLMParam param;
    char *model_path;
    SimModel model;
#if RKLLM_ABI >= 130
    RKLLMCallback callbacks;
#else
    LLMResultCallback callback;
#endif
    int32_t *kv;
    int n_kv;
    int32_t *cache_tokens; /* a loaded prompt cache */
    int n_cache;
    char *template_system, *template_prefix, *template_postfix;
    char *tools_system, *tools_json, *tools_response;
    char lora_names[4][128];
    int n_lora;
    atomic_int abort_flag;
    atomic_int running;
    pthread_t worker;
    int worker_joinable;
    uint64_t rng;
    int kv_clears;
    char init_record[4096];
    char run_record[16384];
    char record[RECORD_SIZE];
    /* the run in flight */
    RKLLMInput input;
    int32_t *input_tokens;
    int n_input;
    char *input_text;
    RKLLMInferParam infer;
    int has_lora;
    char lora_name[128];
    int save_cache;
    char cache_path[1024];
#if RKLLM_ABI >= 130
    int has_sampling;
    RKLLMSamplingParam sampling;
#endif
    void *userdata;
    int run_status;
} Sim;

static double now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1000.0 + ts.tv_nsec / 1e6;
}

static long env_long(const char *name, long fallback) {
    const char *value = getenv(name);
    return value && *value ? strtol(value, NULL, 10) : fallback;
}

__attribute__((unused)) static char *dup_or_null(const char *text) { return text ? strdup(text) : NULL; }

/* Appends JSON for a string (or null) to out. */
static void json_str(char *out, size_t size, const char *text) {
    size_t n = strlen(out);
    if (!text) {
        snprintf(out + n, size - n, "null");
        return;
    }
    if (n + 2 >= size) return;
    out[n++] = '"';
    for (const unsigned char *p = (const unsigned char *)text; *p && n + 8 < size; p++) {
        if (*p == '"' || *p == '\\') {
            out[n++] = '\\';
            out[n++] = *p;
        } else if (*p < 0x20) {
            n += snprintf(out + n, size - n, "\\u%04x", *p);
        } else {
            out[n++] = *p;
        }
    }
    out[n++] = '"';
    out[n] = 0;
}

static void append(char *out, size_t size, const char *format, ...) {
    size_t n = strlen(out);
    va_list args;
    va_start(args, format);
    vsnprintf(out + n, size - n, format, args);
    va_end(args);
}

/* ---- the model file ---------------------------------------------------- */

static int hex_value(int c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    return -1;
}

static int is_word_piece(const unsigned char *piece, int len) {
    if (len < 2 || len > 8) return 0;
    int start = piece[0] == ' ' ? 1 : 0;
    if (len - start < 2) return 0;
    for (int i = start; i < len; i++)
        if (!((piece[i] >= 'a' && piece[i] <= 'z') || (piece[i] >= 'A' && piece[i] <= 'Z'))) return 0;
    return 1;
}

static int load_model(SimModel *model, const char *path) {
    FILE *file = fopen(path, "r");
    if (!file) {
        fprintf(stderr, "E rkllm: failed to open model file %s: %s\n", path, strerror(errno));
        return -1;
    }
    char magic[32] = {0};
    if (fscanf(file, "%31s", magic) != 1 || strcmp(magic, "RKLLM-SIM-1") != 0) {
        fprintf(stderr, "E rkllm: invalid rknn llm model magic in %s\n", path);
        fclose(file);
        return -1;
    }
    if (fscanf(file, "%d %d %d %d", &model->n_vocab, &model->eos_id, &model->n_embd, &model->max_context) != 4 ||
        model->n_vocab <= 0) {
        fclose(file);
        return -1;
    }
    model->pieces = calloc(model->n_vocab, sizeof(unsigned char *));
    model->piece_len = calloc(model->n_vocab, sizeof(int));
    model->candidates = calloc(model->n_vocab, sizeof(int));
    char *line = malloc(4096);
    for (int i = 0; i < model->n_vocab; i++) {
        if (fscanf(file, "%4095s", line) != 1) {
            free(line);
            fclose(file);
            return -1;
        }
        int len = strcmp(line, "-") == 0 ? 0 : (int)strlen(line) / 2;
        model->pieces[i] = malloc(len + 1);
        for (int j = 0; j < len; j++)
            model->pieces[i][j] = (unsigned char)(hex_value(line[2 * j]) * 16 + hex_value(line[2 * j + 1]));
        model->pieces[i][len] = 0;
        model->piece_len[i] = len;
        if (i != model->eos_id && is_word_piece(model->pieces[i], len)) model->candidates[model->n_candidates++] = i;
    }
    free(line);
    fclose(file);
    return model->n_candidates > 0 ? 0 : -1;
}

static void free_model(SimModel *model) {
    for (int i = 0; i < model->n_vocab && model->pieces; i++) free(model->pieces[i]);
    free(model->pieces);
    free(model->piece_len);
    free(model->candidates);
}

/* ---- records ------------------------------------------------------------ */

static void record_init(Sim *sim) {
    RKLLMParam *p = &sim->param;
    char *out = sim->init_record;
    size_t size = sizeof sim->init_record;
    out[0] = 0;
    append(out, size, "{\"abi\": %d, \"model_path\": ", RKLLM_ABI);
    json_str(out, size, p->model_path);
    append(out, size,
           ", \"max_context_len\": %d, \"max_new_tokens\": %d, \"top_k\": %d, \"top_p\": %g, \"temperature\": %g, "
           "\"repeat_penalty\": %g, \"frequency_penalty\": %g, \"presence_penalty\": %g, \"mirostat\": %d, "
           "\"mirostat_tau\": %g, \"mirostat_eta\": %g, \"skip_special_token\": %d, \"is_async\": %d, "
           "\"base_domain_id\": %d",
           p->max_context_len, p->max_new_tokens, p->top_k, p->top_p, p->temperature, p->repeat_penalty,
           p->frequency_penalty, p->presence_penalty, p->mirostat, p->mirostat_tau, p->mirostat_eta,
           p->skip_special_token, p->is_async, p->extend_param.base_domain_id);
#if RKLLM_ABI >= 120
    append(out, size, ", \"n_keep\": %d, \"embed_flash\": %d, \"enabled_cpus_num\": %d, \"enabled_cpus_mask\": %u",
           p->n_keep, p->extend_param.embed_flash, p->extend_param.enabled_cpus_num, p->extend_param.enabled_cpus_mask);
#endif
#if RKLLM_ABI >= 121
    append(out, size, ", \"n_batch\": %d", p->extend_param.n_batch);
#endif
#if RKLLM_ABI >= 130
    append(out, size, ", \"ignore_eos_token\": %d", p->ignore_eos_token);
#endif
    append(out, size, "}");
}

static void record_run(Sim *sim, int reused) {
    char *out = sim->run_record;
    size_t size = sizeof sim->run_record;
    out[0] = 0;
    append(out, size, "{\"input_type\": %d, \"mode\": %d, \"n_tokens\": %d, \"tokens\": [", sim->input.input_type,
           sim->infer.mode, sim->n_input);
    for (int i = 0; i < sim->n_input && i < 512; i++) append(out, size, i ? ", %d" : "%d", sim->input_tokens[i]);
    append(out, size, "], \"prompt\": ");
    json_str(out, size, sim->input_text);
#if RKLLM_ABI >= 121
    append(out, size, ", \"role\": ");
    json_str(out, size, sim->input.role);
    append(out, size, ", \"enable_thinking\": %d", sim->input.enable_thinking);
#endif
#if RKLLM_ABI >= 120
    append(out, size, ", \"keep_history\": %d", sim->infer.keep_history);
#endif
    append(out, size, ", \"lora\": ");
    json_str(out, size, sim->has_lora ? sim->lora_name : NULL);
    append(out, size, ", \"save_prompt_cache\": %d, \"reused\": %d", sim->save_cache, reused);
#if RKLLM_ABI >= 130
    append(out, size, ", \"max_new_tokens\": %d, \"sampling\": ", sim->infer.max_new_tokens);
    if (sim->has_sampling) {
        RKLLMSamplingParam *s = &sim->sampling;
        append(out, size,
               "{\"top_k\": %d, \"top_p\": %g, \"temperature\": %g, \"repeat_penalty\": %g, \"frequency_penalty\": %g, "
               "\"presence_penalty\": %g, \"mirostat\": %d, \"mirostat_tau\": %g, \"mirostat_eta\": %g}",
               s->top_k, s->top_p, s->temperature, s->repeat_penalty, s->frequency_penalty, s->presence_penalty,
               s->mirostat, s->mirostat_tau, s->mirostat_eta);
    } else {
        append(out, size, "null");
    }
#endif
    append(out, size, "}");
}

/* Appends {"k1": v1, "k2": v2, "k3": v3} of strings, or null when the setting was never made. */
static void json_triple(char *out, size_t size, int present, const char *k1, const char *v1, const char *k2,
                        const char *v2, const char *k3, const char *v3) {
    if (!present) {
        append(out, size, "null");
        return;
    }
    append(out, size, "{\"%s\": ", k1);
    json_str(out, size, v1);
    append(out, size, ", \"%s\": ", k2);
    json_str(out, size, v2);
    append(out, size, ", \"%s\": ", k3);
    json_str(out, size, v3);
    append(out, size, "}");
}

/* Everything the simulator received, as JSON: {"init", "last_run", "chat_template", "tools", "lora", ...}. */
const char *rkllm_sim_record(LLMHandle handle) {
    Sim *sim = handle;
    char *out = sim->record;
    size_t size = sizeof sim->record;
    out[0] = 0;
    append(out, size, "{\"init\": %s, \"last_run\": %s, \"chat_template\": ", sim->init_record,
           sim->run_record[0] ? sim->run_record : "null");
    json_triple(out, size, sim->template_prefix != NULL, "system", sim->template_system, "prefix",
                sim->template_prefix, "postfix", sim->template_postfix);
    append(out, size, ", \"tools\": ");
    json_triple(out, size, sim->tools_json != NULL, "system", sim->tools_system, "tools", sim->tools_json,
                "response", sim->tools_response);
    append(out, size, ", \"lora\": [");
    for (int i = 0; i < sim->n_lora; i++) {
        if (i) append(out, size, ", ");
        json_str(out, size, sim->lora_names[i]);
    }
    append(out, size, "], \"n_kv\": %d, \"n_prompt_cache\": %d, \"kv_clears\": %d}", sim->n_kv, sim->n_cache,
           sim->kv_clears);
    return out;
}

/* ---- generation ----------------------------------------------------------- */

static int deliver(Sim *sim, RKLLMResult *result, LLMCallState state) {
#if RKLLM_ABI >= 130
    void *userdata = sim->userdata ? sim->userdata : sim->callbacks.result_userdata;
    return sim->callbacks.result_callback(result, userdata, state);
#elif RKLLM_ABI >= 121
    return sim->callback(result, sim->userdata, state);
#else
    sim->callback(result, sim->userdata, state);
    return 0;
#endif
}

static uint64_t next_random(Sim *sim) {
    sim->rng ^= sim->rng << 13;
    sim->rng ^= sim->rng >> 7;
    sim->rng ^= sim->rng << 17;
    return sim->rng;
}

static int greedy(Sim *sim) {
#if RKLLM_ABI >= 130
    if (sim->has_sampling) return sim->sampling.temperature <= 0 || sim->sampling.top_k == 1;
#endif
    return sim->param.temperature <= 0 || sim->param.top_k == 1;
}

static int32_t next_token(Sim *sim) {
    uint64_t hash = 1469598103934665603ULL;
    int from = sim->n_kv > WINDOW ? sim->n_kv - WINDOW : 0;
    for (int i = from; i < sim->n_kv; i++) {
        hash ^= (uint64_t)(uint32_t)sim->kv[i];
        hash *= 1099511628211ULL;
    }
    if (!greedy(sim)) hash ^= next_random(sim);
    return sim->model.candidates[(hash >> 11) % (uint64_t)sim->model.n_candidates];
}

/* Length of an incomplete UTF-8 sequence at the end of text (0 when it ends on a whole character). */
static int incomplete_tail(const unsigned char *text, int len) {
    for (int back = 1; back <= 3 && back <= len; back++) {
        unsigned char c = text[len - back];
        if ((c & 0xC0) == 0x80) continue;
        int need = c >= 0xF0 ? 4 : c >= 0xE0 ? 3 : c >= 0xC0 ? 2 : 1;
        return need > back ? back : 0;
    }
    return 0;
}

static void sleep_us(long us) {
    if (us > 0) usleep((useconds_t)us);
}

static void fill_perf(RKLLMResult *result, double prefill_ms, int prefill_tokens, double generate_ms, int generated) {
#if RKLLM_ABI >= 121
    struct rusage usage;
    getrusage(RUSAGE_SELF, &usage);
    result->perf.prefill_time_ms = (float)prefill_ms;
    result->perf.prefill_tokens = prefill_tokens;
    result->perf.generate_time_ms = (float)generate_ms;
    result->perf.generate_tokens = generated;
    result->perf.memory_usage_mb = (float)(usage.ru_maxrss / 1024.0);
#else
    (void)result, (void)prefill_ms, (void)prefill_tokens, (void)generate_ms, (void)generated;
#endif
}

static int write_prompt_cache(Sim *sim) {
    FILE *file = fopen(sim->cache_path, "wb");
    if (!file) return -1;
    fwrite("SIMPCACHE", 1, 9, file);
    fwrite(&sim->n_kv, sizeof(int), 1, file);
    fwrite(sim->kv, sizeof(int32_t), sim->n_kv, file);
    return fclose(file) == 0 ? 0 : -1;
}

static int run_hidden(Sim *sim, int first) {
    int n = sim->n_kv - first, d = sim->model.n_embd;
    float *states = malloc(sizeof(float) * (size_t)(n > 0 ? n : 1) * d);
    for (int t = 0; t < n; t++)
        for (int j = 0; j < d; j++) states[(size_t)t * d + j] = sinf(0.013f * (sim->kv[first + t] + 1) * (j + 1) + t * 0.1f);
    RKLLMResult result;
    memset(&result, 0, sizeof result);
    result.token_id = -1;
    result.last_hidden_layer.hidden_states = states;
    result.last_hidden_layer.embd_size = d;
    result.last_hidden_layer.num_tokens = n;
#if RKLLM_ABI < 120
    deliver(sim, &result, RKLLM_RUN_GET_LAST_HIDDEN_LAYER);
#else
    deliver(sim, &result, RKLLM_RUN_NORMAL);
#endif
    free(states); /* like the runtime: the buffer is gone after the callback */
    memset(&result, 0, sizeof result);
    deliver(sim, &result, RKLLM_RUN_FINISH);
    return 0;
}

static int generate(Sim *sim) {
    long token_us = env_long("RKLLM_SIM_TOKEN_US", 1000);
    long error_after = env_long("RKLLM_SIM_ERROR_AFTER", -1);
    long eos_after = env_long("RKLLM_SIM_EOS_AFTER", -1);
    int raw = env_long("RKLLM_SIM_RAW_PIECES", 0) != 0;
    const char *script = getenv("RKLLM_SIM_SCRIPT");
    int capacity = sim->param.max_context_len;
    double start = now_ms();

#if RKLLM_ABI >= 120
    int keep = sim->infer.keep_history;
#else
    int keep = 0;
#endif
    if (!keep) sim->n_kv = 0;
    int first = sim->n_kv;
    if (sim->n_kv + sim->n_input > capacity) {
        RKLLMResult result;
        memset(&result, 0, sizeof result);
        fprintf(stderr, "E rkllm: the input (%d tokens) exceeds max_context_len %d\n", sim->n_input, capacity);
        deliver(sim, &result, RKLLM_RUN_ERROR);
        return -1;
    }
    int reused = 0;
    if (sim->n_kv == 0 && sim->n_cache > 0) /* a loaded prompt cache: its common prefix is not recomputed */
        while (reused < sim->n_cache && reused < sim->n_input && sim->cache_tokens[reused] == sim->input_tokens[reused])
            reused++;
    for (int i = 0; i < sim->n_input; i++) {
        sim->kv[sim->n_kv++] = sim->input_tokens[i];
        if (i >= reused) sleep_us(token_us / 4);
        if (atomic_load(&sim->abort_flag)) break;
    }
    record_run(sim, reused);
    double prefill_done = now_ms();
    if (sim->save_cache && write_prompt_cache(sim) != 0) fprintf(stderr, "E rkllm: cannot write %s\n", sim->cache_path);
    if (atomic_load(&sim->abort_flag)) return 0;
    if (sim->infer.mode == RKLLM_INFER_GET_LAST_HIDDEN_LAYER) return run_hidden(sim, first);

    int limit = sim->param.max_new_tokens;
#if RKLLM_ABI >= 130
    if (sim->infer.max_new_tokens > 0) limit = sim->infer.max_new_tokens;
    int ignore_eos = sim->param.ignore_eos_token;
#else
    int ignore_eos = 0;
#endif
    unsigned char pending[64];
    int n_pending = 0, generated = 0;
    const char *cursor = script;
    RKLLMResult result;
    for (;;) {
        if (atomic_load(&sim->abort_flag)) return 0; /* aborted: no FINISH */
        if ((limit > 0 && generated >= limit) || sim->n_kv >= capacity) break;
        if (error_after >= 0 && generated == error_after) {
            memset(&result, 0, sizeof result);
            fprintf(stderr, "E rkllm: simulated NPU error\n");
            deliver(sim, &result, RKLLM_RUN_ERROR);
            return -1;
        }
        if (eos_after >= 0 && generated == eos_after && !ignore_eos) break;
        int32_t token;
        if (cursor && *cursor) {
            token = (int32_t)strtol(cursor, (char **)&cursor, 10);
            if (*cursor == ',') cursor++;
        } else {
            token = next_token(sim);
        }
        sleep_us(token_us);
        sim->kv[sim->n_kv++] = token;
        generated++;
        memset(&result, 0, sizeof result);
        result.token_id = token;
        const unsigned char *piece = sim->model.pieces[token];
        int len = sim->model.piece_len[token];
        LLMCallState state;
        unsigned char text[80];
        if (n_pending + len > (int)sizeof pending - 1) n_pending = 0;
        memcpy(pending + n_pending, piece, len);
        n_pending += len;
        if (raw) {
            memcpy(text, piece, len);
            text[len] = 0;
            result.text = (const char *)text;
            state = incomplete_tail(pending, n_pending) ? RKLLM_RUN_WAITING : RKLLM_RUN_NORMAL;
            if (state == RKLLM_RUN_NORMAL) n_pending = 0;
        } else {
            if (incomplete_tail(pending, n_pending)) {
                state = RKLLM_RUN_WAITING;
                result.text = NULL;
            } else {
                memcpy(text, pending, n_pending);
                text[n_pending] = 0;
                result.text = (const char *)text;
                n_pending = 0;
                state = RKLLM_RUN_NORMAL;
            }
        }
        int answer = deliver(sim, &result, state);
        if (answer == 1) return 0; /* paused: the KV cache stays, no FINISH */
    }
    memset(&result, 0, sizeof result);
    result.token_id = -1;
    double end = now_ms();
    fill_perf(&result, prefill_done - start, sim->n_input - reused, end - prefill_done, generated);
    deliver(sim, &result, RKLLM_RUN_FINISH);
    return 0;
}

static void *worker_main(void *arg) {
    Sim *sim = arg;
    sim->run_status = generate(sim);
    atomic_store(&sim->running, 0);
    return NULL;
}

/* Copies what the caller passed: the caller's buffers need only live for the call (rkllm_run blocks anyway). */
static int take_input(Sim *sim, RKLLMInput *input, RKLLMInferParam *infer) {
    free(sim->input_tokens);
    free(sim->input_text);
    sim->input_tokens = NULL;
    sim->input_text = NULL;
    sim->n_input = 0;
    sim->input = *input;
    sim->infer = *infer;
    sim->has_lora = infer->lora_params && infer->lora_params->lora_adapter_name;
    if (sim->has_lora) snprintf(sim->lora_name, sizeof sim->lora_name, "%s", infer->lora_params->lora_adapter_name);
    sim->save_cache = infer->prompt_cache_params && infer->prompt_cache_params->save_prompt_cache;
    if (sim->save_cache) {
        const char *path = infer->prompt_cache_params->prompt_cache_path;
        snprintf(sim->cache_path, sizeof sim->cache_path, "%s", path ? path : "./prompt_cache.bin");
    }
#if RKLLM_ABI >= 130
    sim->has_sampling = infer->sampling_params != NULL;
    if (sim->has_sampling) sim->sampling = *infer->sampling_params;
#endif
    if (input->input_type == RKLLM_INPUT_TOKEN) {
        RKLLMTokenInput *tokens = &input->token_input;
        if (!tokens->input_ids || tokens->n_tokens == 0) return -1;
        sim->n_input = (int)tokens->n_tokens;
        sim->input_tokens = malloc(sizeof(int32_t) * sim->n_input);
        for (int i = 0; i < sim->n_input; i++) {
            if (tokens->input_ids[i] < 0 || tokens->input_ids[i] >= sim->model.n_vocab) return -1;
            sim->input_tokens[i] = tokens->input_ids[i];
        }
    } else if (input->input_type == RKLLM_INPUT_PROMPT) {
        const char *prompt = input->prompt_input;
        if (!prompt) return -1;
        /* the runtime's own template applies to PROMPT input only; the "tokens" are the bytes, mod the vocabulary */
        size_t size = strlen(prompt) + 1;
        const char *prefix = sim->template_prefix ? sim->template_prefix : "";
        const char *postfix = sim->template_postfix ? sim->template_postfix : "";
        size += strlen(prefix) + strlen(postfix);
        sim->input_text = malloc(size);
        snprintf(sim->input_text, size, "%s%s%s", prefix, prompt, postfix);
        sim->n_input = (int)strlen(sim->input_text);
        if (sim->n_input == 0) return -1;
        sim->input_tokens = malloc(sizeof(int32_t) * sim->n_input);
        for (int i = 0; i < sim->n_input; i++)
            sim->input_tokens[i] = (unsigned char)sim->input_text[i] % sim->model.n_vocab;
    } else {
        return -1; /* embedding and multimodal input are not simulated */
    }
    return 0;
}

static int start(Sim *sim, RKLLMInput *input, RKLLMInferParam *infer, void *userdata) {
    if (!sim || !input || !infer) return -1;
    if (sim->worker_joinable) {
        if (atomic_load(&sim->running)) return -1;
        pthread_join(sim->worker, NULL);
        sim->worker_joinable = 0;
    }
    if (take_input(sim, input, infer) != 0) return -1;
    sim->userdata = userdata;
    atomic_store(&sim->abort_flag, 0);
    atomic_store(&sim->running, 1);
    if (pthread_create(&sim->worker, NULL, worker_main, sim) != 0) {
        atomic_store(&sim->running, 0);
        return -1;
    }
    sim->worker_joinable = 1;
    return 0;
}

/* ---- the API ------------------------------------------------------------------ */

RKLLMParam rkllm_createDefaultParam(void) {
    RKLLMParam param;
    memset(&param, 0, sizeof param);
    param.max_context_len = 512;
    param.max_new_tokens = -1;
    param.top_k = 40;
    param.top_p = 0.9f;
    param.temperature = 0.8f;
    param.repeat_penalty = 1.1f;
    param.mirostat_tau = 5.0f;
    param.mirostat_eta = 0.1f;
    param.skip_special_token = true;
#if RKLLM_ABI >= 120
    param.extend_param.enabled_cpus_num = 4;
#endif
    return param;
}

#if RKLLM_ABI >= 130
int rkllm_init(LLMHandle *handle, RKLLMParam *param, RKLLMCallback *callback) {
    if (!handle || !param || !callback || !callback->result_callback) return -1;
#else
int rkllm_init(LLMHandle *handle, RKLLMParam *param, LLMResultCallback callback) {
    if (!handle || !param || !callback) return -1;
#endif
    *handle = NULL;
    if (env_long("RKLLM_SIM_FAIL_INIT", 0)) {
        fprintf(stderr, "E rkllm: simulated init failure\n");
        return -1;
    }
    Sim *sim = calloc(1, sizeof(Sim));
    if (!param->model_path || load_model(&sim->model, param->model_path) != 0) {
        free_model(&sim->model);
        free(sim);
        return -1;
    }
    if (param->max_context_len <= 0 || param->max_context_len > sim->model.max_context) {
        fprintf(stderr, "E rkllm: max_context_len %d must be in 1..%d (the converted model's max_context)\n",
                param->max_context_len, sim->model.max_context);
        free_model(&sim->model);
        free(sim);
        return -1;
    }
    sim->param = *param;
    sim->model_path = strdup(param->model_path);
    sim->param.model_path = sim->model_path;
#if RKLLM_ABI >= 130
    sim->callbacks = *callback;
#else
    sim->callback = callback;
#endif
    sim->kv = calloc(param->max_context_len, sizeof(int32_t));
    sim->rng = (uint64_t)time(NULL) ^ (uint64_t)(uintptr_t)sim ^ 0x9E3779B97F4A7C15ULL;
    record_init(sim);
    *handle = sim;
    return 0;
}

int rkllm_load_lora(LLMHandle handle, RKLLMLoraAdapter *lora) {
    Sim *sim = handle;
    if (!sim || !lora || !lora->lora_adapter_path || !lora->lora_adapter_name || sim->n_lora >= 4) return -1;
    if (access(lora->lora_adapter_path, R_OK) != 0) return -1;
    snprintf(sim->lora_names[sim->n_lora++], 128, "%s", lora->lora_adapter_name);
    return 0;
}

int rkllm_load_prompt_cache(LLMHandle handle, const char *path) {
    Sim *sim = handle;
    if (!sim || !path) return -1;
    FILE *file = fopen(path, "rb");
    if (!file) return -1;
    char magic[9];
    int n = 0;
    if (fread(magic, 1, 9, file) != 9 || memcmp(magic, "SIMPCACHE", 9) != 0 || fread(&n, sizeof n, 1, file) != 1 ||
        n < 0 || n > sim->param.max_context_len) {
        fclose(file);
        return -1;
    }
    int32_t *tokens = malloc(sizeof(int32_t) * (n ? n : 1));
    if ((int)fread(tokens, sizeof(int32_t), n, file) != n) {
        free(tokens);
        fclose(file);
        return -1;
    }
    fclose(file);
    free(sim->cache_tokens);
    sim->cache_tokens = tokens;
    sim->n_cache = n;
    return 0;
}

int rkllm_release_prompt_cache(LLMHandle handle) {
    Sim *sim = handle;
    if (!sim) return -1;
    free(sim->cache_tokens);
    sim->cache_tokens = NULL;
    sim->n_cache = 0;
    return 0;
}

int rkllm_run(LLMHandle handle, RKLLMInput *input, RKLLMInferParam *infer, void *userdata) {
    Sim *sim = handle;
    if (start(sim, input, infer, userdata) != 0) return -1;
    pthread_join(sim->worker, NULL); /* blocks; the callbacks came from the worker thread */
    sim->worker_joinable = 0;
    return sim->run_status;
}

int rkllm_run_async(LLMHandle handle, RKLLMInput *input, RKLLMInferParam *infer, void *userdata) {
    Sim *sim = handle;
    if (!sim || !sim->param.is_async) return -1;
    return start(sim, input, infer, userdata);
}

int rkllm_abort(LLMHandle handle) {
    Sim *sim = handle;
    if (!sim) return -1;
    atomic_store(&sim->abort_flag, 1);
    return 0;
}

int rkllm_is_running(LLMHandle handle) {
    Sim *sim = handle;
    if (!sim) return -1;
    int running = atomic_load(&sim->running);
#if RKLLM_ABI >= 130
    return running ? 1 : 0;
#else
    return running ? 0 : 1; /* the 1.x headers: 0 means running */
#endif
}

int rkllm_destroy(LLMHandle handle) {
    Sim *sim = handle;
    if (!sim) return -1;
    atomic_store(&sim->abort_flag, 1);
    if (sim->worker_joinable) pthread_join(sim->worker, NULL);
    free_model(&sim->model);
    free(sim->model_path);
    free(sim->kv);
    free(sim->cache_tokens);
    free(sim->input_tokens);
    free(sim->input_text);
    free(sim->template_system);
    free(sim->template_prefix);
    free(sim->template_postfix);
    free(sim->tools_system);
    free(sim->tools_json);
    free(sim->tools_response);
    free(sim);
    return 0;
}

#if RKLLM_ABI >= 120
static int clear_kv(Sim *sim, int keep_system_prompt, int *start_pos, int *end_pos) {
    (void)keep_system_prompt;
    if (!sim || atomic_load(&sim->running)) return -1;
    if (start_pos && end_pos) {
        int from = *start_pos, to = *end_pos;
        if (from < 0 || to > sim->n_kv || from > to) return -1;
        memmove(sim->kv + from, sim->kv + to, sizeof(int32_t) * (sim->n_kv - to));
        sim->n_kv -= to - from;
    } else {
        sim->n_kv = 0;
    }
    sim->kv_clears++;
    return 0;
}
#endif

#if RKLLM_ABI >= 121
int rkllm_clear_kv_cache(LLMHandle handle, int keep_system_prompt, int *start_pos, int *end_pos) {
    return clear_kv(handle, keep_system_prompt, start_pos, end_pos);
}

int rkllm_get_kv_cache_size(LLMHandle handle, int *cache_sizes) {
    Sim *sim = handle;
    if (!sim || !cache_sizes) return -1;
    cache_sizes[0] = sim->n_kv;
    return 0;
}

int rkllm_set_function_tools(LLMHandle handle, const char *system_prompt, const char *tools, const char *response) {
    Sim *sim = handle;
    if (!sim || !tools) return -1;
    free(sim->tools_system);
    free(sim->tools_json);
    free(sim->tools_response);
    sim->tools_system = dup_or_null(system_prompt);
    sim->tools_json = dup_or_null(tools);
    sim->tools_response = dup_or_null(response);
    return 0;
}

int rkllm_set_cross_attn_params(LLMHandle handle, RKLLMCrossAttnParam *params) {
    return handle && params ? 0 : -1;
}
#elif RKLLM_ABI >= 120
int rkllm_clear_kv_cache(LLMHandle handle, int keep_system_prompt) {
    return clear_kv(handle, keep_system_prompt, NULL, NULL);
}
#endif

#if RKLLM_ABI >= 120
int rkllm_set_chat_template(LLMHandle handle, const char *system_prompt, const char *prefix, const char *postfix) {
    Sim *sim = handle;
    if (!sim || !system_prompt || !prefix || !postfix) return -1;
    free(sim->template_system);
    free(sim->template_prefix);
    free(sim->template_postfix);
    sim->template_system = strdup(system_prompt);
    sim->template_prefix = strdup(prefix);
    sim->template_postfix = strdup(postfix);
    return 0;
}
#endif
