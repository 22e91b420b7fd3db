// The generated Kotlin bindings (JVM + JNA, as on Android) against a real coordinator on
// 127.0.0.1: the same scenario as bindings/tests/test_python.py. Starts
// `crosslm-coordinator serve` with a file generator for each test, and drives the client the
// way an app would: enroll, load a small data file, train, take part in a round with progress
// callbacks, cancel a waiting join, and bad input. Run by run.sh:
//   java ... BindingsTestKt <crosslm-coordinator> <assets dir> <scratch dir>
// Prints "kotlin: N passed, M failed" and exits non-zero on any failed check.
import org.crosslm.*
import kotlinx.coroutines.Dispatchers
import kotlinx.coroutines.async
import kotlinx.coroutines.delay
import kotlinx.coroutines.runBlocking
import kotlinx.coroutines.withTimeout
import java.io.File
import java.net.DatagramSocket
import java.net.InetAddress
import java.util.concurrent.TimeUnit
import kotlin.system.exitProcess

val TASK = """
name = "mr"
description = "movie review polarity"
classify_template = "Review: {text}\nSentiment ({labels}):"
[[labels]]
name = "negative"
prompts = ["Write a negative movie review sentence."]
[[labels]]
name = "positive"
prompts = ["Write a positive movie review sentence."]
"""

val NEG = listOf("dull", "lifeless", "boring", "awful", "tedious")
val POS = listOf("warm", "wonderful", "moving", "brilliant", "charming")

// Long calls are bounded, so a hang fails the test instead of stalling CI.
const val LONG_MS = 300_000L

class CheckFailed(what: String) : AssertionError(what)

fun verify(ok: Boolean, what: String) {
    if (!ok) throw CheckFailed(what)
}

fun <T> checkEq(actual: T, expected: T, what: String) {
    if (actual != expected) throw CheckFailed("$what: expected $expected, got $actual")
}

/** Runs [block] and returns the exception of type [E] it threw; fails if it threw none or another. */
inline fun <reified E : CrossLmException> expectError(what: String, block: () -> Unit): E {
    try {
        block()
    } catch (e: CrossLmException) {
        if (e is E) return e
        throw CheckFailed("$what: expected ${E::class.simpleName}, got ${e::class.simpleName}: ${e.message}")
    }
    throw CheckFailed("$what: expected ${E::class.simpleName}, nothing was thrown")
}

/** n labeled rows, alternating labels, distinct wording per label (as in the Python test). */
fun rows(n: Int): List<Pair<String, String>> = (0 until n).map { i ->
    val (label, words) = if (i % 2 == 0) "negative" to NEG else "positive" to POS
    "a ${words[i % 5]} and ${words[(i / 2 + 1) % 5]} film, take $i" to label
}

fun jsonString(s: String) = "\"" + s.replace("\\", "\\\\").replace("\"", "\\\"") + "\""

fun writePrivate(path: File, n: Int): File {
    path.writeText(rows(n).joinToString("") { (text, label) ->
        "{\"text\": ${jsonString(text)}, \"label\": ${jsonString(label)}}\n"
    })
    return path
}

fun freeUdpPort(): Int = DatagramSocket(0, InetAddress.getLoopbackAddress()).use { it.localPort }

/** `crosslm-coordinator serve` with a file generator; prints tokens, writes its address. */
class Coordinator(
    binary: String, dir: File, rounds: Int = 1, perLabel: Int = 10, minClients: Int = 1, tokens: Int = 1,
) {
    val log = File(dir, "coordinator.log")
    val proc: Process
    val tokens = mutableListOf<String>()
    val addr: String

    init {
        File(dir, "task.toml").writeText(TASK)
        File(dir, "samples.jsonl").writeText(buildString {
            for (i in 0 until perLabel) {
                append("{\"text\": \"a dull, lifeless film number $i\", \"label\": \"negative\"}\n")
                append("{\"text\": \"a warm and wonderful film number $i\", \"label\": \"positive\"}\n")
            }
        })
        val cfg = File(dir, "coordinator.toml")
        cfg.writeText("""
task = "task.toml"
[daemon]
listen = "127.0.0.1:0"
data_dir = "coord"
rounds = $rounds
samples_per_label = $perLabel
min_clients = $minClients
idle_timeout_ms = 5000
linger_ms = 5000
[daemon.round]
quorum = 1
deadline_ms = 120000
[generator]
kind = "file"
path = "samples.jsonl"
""")
        val addrFile = File(dir, "addr")
        val pb = ProcessBuilder(
            binary, "serve", "--config", cfg.path, "--print-tokens", "$tokens", "--addr-file", addrFile.path,
        ).redirectError(log)
        pb.environment()["NO_COLOR"] = "1" // plain text in coordinator.log
        proc = pb.start()
        try {
            val out = proc.inputStream.bufferedReader()
            while (this.tokens.size < tokens) {
                val line = out.readLine() ?: throw IllegalStateException("coordinator exited, see ${tail()}")
                if (line.startsWith("enrollment token: ")) this.tokens.add(line.substringAfter(": ").trim())
            }
            // Keep draining stdout so the coordinator never blocks on a full pipe.
            Thread { out.useLines { lines -> lines.forEach { } } }.apply { isDaemon = true }.start()
            val deadline = System.nanoTime() + TimeUnit.SECONDS.toNanos(60)
            while (addrFile.readTextOrEmpty().isEmpty()) {
                verify(proc.isAlive, "coordinator exited before listening: ${tail()}")
                verify(System.nanoTime() < deadline, "coordinator did not start listening")
                Thread.sleep(50)
            }
            addr = addrFile.readTextOrEmpty()
        } catch (e: Throwable) {
            stop()
            throw e
        }
    }

    fun tail(): String = log.readTextOrEmpty().lines().takeLast(15).joinToString("\n")

    fun stop() {
        if (proc.isAlive) proc.destroyForcibly()
        proc.waitFor(10, TimeUnit.SECONDS)
    }
}

fun File.readTextOrEmpty(): String = if (exists()) readText().trim() else ""

/** Collects progress events (called from the library's threads). */
class Recorder : ProgressListener {
    private val events = mutableListOf<ProgressEvent>()
    override fun onProgress(event: ProgressEvent) {
        synchronized(events) { events.add(event) }
    }

    fun of(activity: Activity): List<ProgressEvent> = synchronized(events) { events.filter { it.activity == activity } }
}

class Env(val coordinatorBinary: String, val assets: String, val dir: File) {
    val coordinators = mutableListOf<Coordinator>()

    fun coordinator(rounds: Int = 1, perLabel: Int = 10, minClients: Int = 1, tokens: Int = 1): Coordinator {
        val d = File(dir, "coordinator-${coordinators.size}").apply { mkdirs() }
        return Coordinator(coordinatorBinary, d, rounds, perLabel, minClients, tokens).also { coordinators.add(it) }
    }

    fun settings(dataDir: File, coordinator: String?): ClientSettings {
        val s = defaultSettings(dataDir.path)
        s.coordinator = coordinator
        s.name = "kotlin-test"
        s.arch = SlmArch.BAG
        s.modelDir = "$assets/minilm"
        s.trainEpochs = 20u
        s.testFraction = 0.25
        s.connectTimeoutMs = 5000UL
        return s
    }

    fun stop() = coordinators.forEach { it.stop() }
}

fun enrollLoadTrainAndTakePartInARound(env: Env) {
    val coord = env.coordinator(rounds = 1, perLabel = 10, minClients = 1, tokens = 1)
    val client = CrossLmClient(env.settings(File(env.dir, "client"), coord.addr))
    val rec = Recorder()
    client.setListener(rec)

    val clientId = runBlocking { withTimeout(LONG_MS) { client.enroll(coord.tokens[0]) } }
    verify(clientId.isNotEmpty(), "a client id")
    checkEq(client.status().clientId, clientId, "status().clientId")

    val data = client.loadDataFile(writePrivate(File(env.dir, "private.jsonl"), 40).path)
    checkEq(data.examples to data.testExamples, 30UL to 10UL, "examples, test examples")
    checkEq(data.labels, listOf("negative", "positive"), "labels")

    val t = runBlocking { withTimeout(LONG_MS) { client.train() } }
    verify(t.steps > 0UL, "training steps: ${t.steps}")
    verify(t.localAccuracy != null, "local accuracy after training")
    val steps = rec.of(Activity.TRAINING).filter { it.total > 0UL }
    verify(steps.isNotEmpty(), "training progress reported")
    checkEq(steps.last().done, steps.last().total, "last training event done == total")
    verify(client.status().checkpoint != null, "a checkpoint after training")

    val j = runBlocking { withTimeout(LONG_MS) { client.join(1UL) } }
    checkEq(Triple(j.rounds, j.lastRound, j.cancelled), Triple(1UL, 1UL, false), "join: rounds, lastRound, cancelled")
    verify(j.localAccuracy != null, "local accuracy after the round")
    val scoring = rec.of(Activity.SCORING)
    verify(scoring.isNotEmpty() && scoring.last().done == 20UL && scoring.last().total == 20UL,
        "scoring progress ends at 20/20: ${scoring.map { it.done to it.total }}")
    verify(scoring.all { it.round == 1UL }, "scoring events name round 1: ${scoring.map { it.round }}")
    val finished = rec.of(Activity.ROUND_FINISHED)
    checkEq(finished.map { it.round }, listOf<ULong?>(1UL), "round-finished events")
    verify(finished[0].accuracy != null, "round-finished carries an accuracy")

    val s = client.status()
    checkEq(s.lastRound to s.roundsCompleted, 1UL to 1UL, "status: lastRound, roundsCompleted")
    checkEq(s.activity, Activity.IDLE, "status().activity after join")
    val state = File(env.dir, "client/state.json").readText()
    verify(Regex("\"last_round\"\\s*:\\s*1\\b").containsMatchIn(state), "state.json last_round 1: $state")
    verify(state.contains(Regex("\"client_id\"\\s*:\\s*" + Regex.escape(jsonString(clientId)))),
        "state.json client_id $clientId: $state")
    client.close()
}

fun cancelLeavesAJoinThatWaitsForRounds(env: Env) {
    // Two clients needed: no round opens for one.
    val coord = env.coordinator(rounds = 1, perLabel = 5, minClients = 2, tokens = 1)
    val client = CrossLmClient(env.settings(File(env.dir, "client"), coord.addr))
    val rec = Recorder()
    client.setListener(rec)
    runBlocking { withTimeout(LONG_MS) { client.enroll(coord.tokens[0]) } }
    val data = client.loadDataRows(rows(20).map { (text, label) -> LabeledText(text, label) })
    checkEq(data.examples + data.testExamples, 20UL, "rows loaded")
    runBlocking { withTimeout(LONG_MS) { client.train() } }

    val (summary, tookMs) = runBlocking {
        val join = async(Dispatchers.Default) { client.join(null) }
        val deadline = System.nanoTime() + TimeUnit.SECONDS.toNanos(30)
        while (client.status().activity != Activity.WAITING) {
            verify(System.nanoTime() < deadline, "never joined: ${client.status().activity}")
            verify(!join.isCompleted, "join ended before waiting")
            delay(50)
        }
        // A second long operation meanwhile is refused.
        expectError<CrossLmException.Busy>("train during join") { client.train() }
        val started = System.nanoTime()
        client.cancel()
        val summary = withTimeout(15_000) { join.await() }
        summary to (System.nanoTime() - started) / 1_000_000
    }
    verify(summary.cancelled, "join summary says cancelled")
    checkEq(summary.rounds, 0UL, "rounds of a cancelled join")
    verify(tookMs < 20_000, "cancel took $tookMs ms")
    verify(rec.of(Activity.STOPPING).isNotEmpty(), "a stopping event")
    verify(client.status().checkpoint != null, "checkpoint kept")

    // Cancelling the coroutine (not the client) must also end the join: the library cancels
    // the operation that nobody awaits any more, so the client is free again.
    val freedMs = runBlocking {
        val join = async(Dispatchers.Default) { client.join(null) }
        val deadline = System.nanoTime() + TimeUnit.SECONDS.toNanos(30)
        while (client.status().activity != Activity.WAITING) {
            verify(System.nanoTime() < deadline, "never joined again: ${client.status().activity}")
            delay(50)
        }
        val started = System.nanoTime()
        join.cancel()
        while (client.status().activity != Activity.IDLE) {
            verify(System.nanoTime() - started < TimeUnit.SECONDS.toNanos(15),
                "join still ${client.status().activity} after its coroutine was cancelled")
            delay(50)
        }
        (System.nanoTime() - started) / 1_000_000
    }
    verify(freedMs < 15_000, "coroutine cancel took $freedMs ms")
    runBlocking { withTimeout(LONG_MS) { client.train() } }
    client.close()
}

fun badInputIsAClearError(env: Env) {
    val port = freeUdpPort()
    val s = env.settings(File(env.dir, "client"), "127.0.0.1:$port")
    s.connectTimeoutMs = 1500UL
    val client = CrossLmClient(s)
    checkEq(client.status().activity, Activity.IDLE, "a new client is idle")
    checkEq(client.status().clientId, null, "a new client is not enrolled")

    val io = expectError<CrossLmException.Io>("missing file") {
        client.loadDataFile(File(env.dir, "no-such-file.jsonl").path)
    }
    verify(io.detail.contains("no-such-file.jsonl"), "Io names the file: ${io.detail}")
    // What a Kotlin app sees first: Throwable.message carries the same text.
    verify(io.message.contains("no-such-file.jsonl"), "Io message names the file: ${io.message}")
    val noData = expectError<CrossLmException.NotReady>("train without data") { runBlocking { client.train() } }
    verify(noData.detail.contains("no private data"), "no private data: ${noData.detail}")
    val notEnrolled = expectError<CrossLmException.NotReady>("join before enroll") { runBlocking { client.join(1UL) } }
    verify(notEnrolled.detail.contains("not enrolled"), "not enrolled: ${notEnrolled.detail}")
    val malformed = expectError<CrossLmException.Enrollment>("malformed token") {
        runBlocking { client.enroll("not-a-token") }
    }
    verify(malformed.detail.contains("malformed token"), "malformed token: ${malformed.detail}")
    // Unreachable coordinator: nothing listens there.
    val token = "xlm1." + "ab".repeat(16) + "." + "cd".repeat(32)
    val started = System.nanoTime()
    val unreachable = expectError<CrossLmException.Network>("unreachable coordinator") {
        runBlocking { withTimeout(LONG_MS) { client.enroll(token) } }
    }
    verify(unreachable.detail.contains("unreachable"), "unreachable: ${unreachable.detail}")
    val tookMs = (System.nanoTime() - started) / 1_000_000
    verify(tookMs < 10_000, "unreachable took $tookMs ms")
    client.close()

    // Wrong token for a real coordinator: refused with the reason.
    val coord = env.coordinator(rounds = 1, perLabel = 5, minClients = 1, tokens = 1)
    val parts = coord.tokens[0].split(".")
    checkEq(parts.size, 3, "token parts")
    val (prefix, secret, fingerprint) = parts
    val wrong = listOf(prefix, (if (secret[0] != '0') "0" else "1") + secret.substring(1), fingerprint).joinToString(".")
    val client2 = CrossLmClient(env.settings(File(env.dir, "two"), coord.addr))
    val refused = expectError<CrossLmException.Refused>("wrong token") {
        runBlocking { withTimeout(LONG_MS) { client2.enroll(wrong) } }
    }
    verify(refused.detail.contains("token"), "refusal names the token: ${refused.detail}")
    checkEq(refused.code, RefusalCode.BAD_TOKEN, "refusal code")
    checkEq(client2.status().clientId, null, "not enrolled after a refusal")
    client2.close()

    val bad = env.settings(File(env.dir, "client"), null)
    bad.testFraction = 1.5
    val invalid = expectError<CrossLmException.InvalidInput>("test fraction 1.5") { CrossLmClient(bad) }
    verify(invalid.detail.contains("test fraction"), "names the setting: ${invalid.detail}")
}

fun main(args: Array<String>) {
    if (args.size != 3) {
        System.err.println("usage: BindingsTestKt <crosslm-coordinator> <assets dir> <scratch dir>")
        exitProcess(2)
    }
    val (coordinator, assets, scratch) = args
    val tests = listOf(
        "enroll_load_train_and_take_part_in_a_round" to ::enrollLoadTrainAndTakePartInARound,
        "cancel_leaves_a_join_that_waits_for_rounds" to ::cancelLeavesAJoinThatWaitsForRounds,
        "bad_input_is_a_clear_error" to ::badInputIsAClearError,
    )
    val envs = mutableListOf<Env>()
    // Coordinators die with the JVM, also on SIGTERM (run.sh's timeout).
    Runtime.getRuntime().addShutdownHook(Thread { synchronized(envs) { envs.forEach { it.stop() } } })
    var passed = 0
    var failed = 0
    for ((name, test) in tests) {
        val env = Env(coordinator, assets, File(scratch, name).apply { mkdirs() })
        synchronized(envs) { envs.add(env) }
        val started = System.nanoTime()
        try {
            test(env)
            passed++
            println("ok   $name (${(System.nanoTime() - started) / 1_000_000} ms)")
        } catch (e: Throwable) {
            failed++
            println("FAIL $name: $e")
            e.printStackTrace(System.out)
            env.coordinators.forEach { println("--- ${it.log}:\n${it.tail()}") }
        } finally {
            env.stop()
        }
    }
    println("kotlin: $passed passed, $failed failed")
    exitProcess(if (failed > 0 || passed == 0) 1 else 0)
}
