// Kotlin smoke test of the generated bindings (JVM + JNA, as on Android): loads the library,
// checks settings, a progress listener, and clear errors; run by run.sh. Not run in CI: it
// needs a newer Kotlin than Debian ships (see run.sh).
import org.crosslm.*
import kotlinx.coroutines.runBlocking

class Recorder : ProgressListener {
    val events = mutableListOf<ProgressEvent>()
    override fun onProgress(event: ProgressEvent) {
        synchronized(events) { events.add(event) }
    }
}

fun check(ok: Boolean, what: String) {
    if (!ok) throw AssertionError(what)
}

fun main(args: Array<String>) {
    val dir = args[0]
    var passed = 0
    val settings = defaultSettings(dir + "/client")
    settings.coordinator = "127.0.0.1:9"
    settings.arch = SlmArch.BAG
    settings.connectTimeoutMs = 1000UL
    val client = CrossLmClient(settings)
    client.setListener(Recorder())
    check(client.status().activity == Activity.IDLE, "idle")
    check(client.status().clientId == null, "not enrolled")
    passed++

    try {
        client.loadDataFile(dir + "/no-such-file.jsonl")
        throw AssertionError("missing file accepted")
    } catch (e: CrossLmException.Io) {
        check(e.message!!.contains("no-such-file.jsonl"), "message names the file: " + e.message)
    }
    passed++

    runBlocking {
        try {
            client.join(1UL)
            throw AssertionError("join before enroll accepted")
        } catch (e: CrossLmException.NotReady) {
            check(e.message!!.contains("not enrolled"), "not enrolled: " + e.message)
        }
        try {
            client.enroll("not-a-token")
            throw AssertionError("malformed token accepted")
        } catch (e: CrossLmException.Enrollment) {
            check(e.message!!.contains("malformed token"), "malformed: " + e.message)
        }
    }
    passed++
    println("kotlin: $passed passed, 0 failed")
}
