// Hop B of the parent-inference benchmark (bench_parents.rs) as a Java 17 service:
// a com.sun.net.httpserver.HttpServer on a fixed pool of 16 handler threads; every
// outgoing call through one shared java.net.http.HttpClient (HTTP/1.1), sent with
// the blocking send() from the handler thread while the client's own selector
// thread does the socket I/O; at most 4 calls in flight (a semaphore), so at most
// 4 pooled keep-alive connections to the next hop, shared by all requests; the
// PostgreSQL query over JDBC (Debian's libpostgresql-jdbc-java) through a pool of
// at most 4 connections kept in a BlockingQueue (opened on demand, so while the
// agent runs). Concurrent requests queue on, and take turns over, the same pooled
// connections.
//
// build: javac -d OUT JavaGateway.java
// usage: java -Djdk.httpclient.connectionPoolSize=4 -cp OUT:/usr/share/java/postgresql.jar \
//          JavaGateway PORT --next URL [--calls N] [--pg PGPORT]
//
// Per request GET /r/<id>: --calls sequential GETs to {next}/r/<id>, then
// {next}/r2/<id>, ...; with --pg one `SELECT 1 AS b_<id>`; then 200 "ok\n".

import com.sun.net.httpserver.HttpExchange;
import com.sun.net.httpserver.HttpServer;
import java.io.IOException;
import java.io.OutputStream;
import java.net.InetSocketAddress;
import java.net.URI;
import java.net.http.HttpClient;
import java.net.http.HttpRequest;
import java.net.http.HttpResponse;
import java.nio.charset.StandardCharsets;
import java.sql.Connection;
import java.sql.DriverManager;
import java.sql.ResultSet;
import java.sql.Statement;
import java.time.Duration;
import java.util.concurrent.ArrayBlockingQueue;
import java.util.concurrent.BlockingQueue;
import java.util.concurrent.Executors;
import java.util.concurrent.Semaphore;

public final class JavaGateway {
    private static final int POOL = 4;

    private final String next;
    private final int calls;
    private final HttpClient client;
    private final Semaphore inFlight = new Semaphore(POOL, true);
    private final String dbUrl;
    private final BlockingQueue<Connection> db;
    /** Connections the pool may still open: it opens them on demand, up to POOL. */
    private final Semaphore unopened = new Semaphore(POOL);

    private JavaGateway(String next, int calls, Integer pgPort) throws Exception {
        this.next = next;
        this.calls = calls;
        this.client = HttpClient.newBuilder()
                .version(HttpClient.Version.HTTP_1_1)
                .connectTimeout(Duration.ofSeconds(10))
                .build();
        this.dbUrl = pgPort == null ? null : "jdbc:postgresql://127.0.0.1:" + pgPort + "/postgres";
        this.db = pgPort == null ? null : new ArrayBlockingQueue<>(POOL);
    }

    private int get(String path) throws IOException, InterruptedException {
        HttpRequest request = HttpRequest.newBuilder(URI.create(next + path))
                .timeout(Duration.ofSeconds(30))
                .GET()
                .build();
        inFlight.acquire();
        try {
            return client.send(request, HttpResponse.BodyHandlers.ofString()).statusCode();
        } finally {
            inFlight.release();
        }
    }

    /** An idle pooled connection, a new one while fewer than POOL are open, else the next one given back. */
    private Connection borrow() throws Exception {
        Connection c = db.poll();
        if (c != null) {
            return c;
        }
        if (unopened.tryAcquire()) {
            try {
                c = DriverManager.getConnection(dbUrl, "postgres", "");
                c.setAutoCommit(true);
                return c;
            } catch (Exception e) {
                unopened.release();
                throw e;
            }
        }
        return db.take();
    }

    private void query(long id) throws Exception {
        Connection c = borrow();
        try (Statement st = c.createStatement(); ResultSet rs = st.executeQuery("SELECT 1 AS b_" + id)) {
            rs.next();
        } finally {
            db.put(c);
        }
    }

    private void handle(HttpExchange exchange) throws IOException {
        int status = 200;
        String body = "ok\n";
        try {
            String path = exchange.getRequestURI().getPath();
            long id = Long.parseLong(path.substring(path.lastIndexOf('/') + 1));
            for (int leg = 1; leg <= calls && status == 200; leg++) {
                String prefix = leg == 1 ? "r" : "r" + leg;
                int answered = get("/" + prefix + "/" + id);
                if (answered != 200) {
                    status = 502;
                    body = "next hop answered " + answered + "\n";
                }
            }
            if (status == 200 && db != null) {
                query(id);
            }
        } catch (NumberFormatException e) {
            status = 404;
            body = "no id\n";
        } catch (Exception e) {
            status = 502;
            body = e + "\n";
        }
        byte[] bytes = body.getBytes(StandardCharsets.UTF_8);
        exchange.getResponseHeaders().set("Content-Type", "text/plain");
        exchange.sendResponseHeaders(status, bytes.length);
        try (OutputStream out = exchange.getResponseBody()) {
            out.write(bytes);
        }
    }

    public static void main(String[] argv) throws Exception {
        if (argv.length < 1) {
            System.err.println("usage: JavaGateway PORT --next URL [--calls N] [--pg PGPORT]");
            System.exit(2);
        }
        int port = Integer.parseInt(argv[0]);
        String next = null;
        int calls = 1;
        Integer pg = null;
        for (int i = 1; i + 1 < argv.length; i += 2) {
            switch (argv[i]) {
                case "--next" -> next = argv[i + 1];
                case "--calls" -> calls = Integer.parseInt(argv[i + 1]);
                case "--pg" -> pg = Integer.parseInt(argv[i + 1]);
                default -> throw new IllegalArgumentException("unknown argument " + argv[i]);
            }
        }
        if (next == null) {
            throw new IllegalArgumentException("--next is required");
        }
        JavaGateway gateway = new JavaGateway(next, calls, pg);
        HttpServer server = HttpServer.create(new InetSocketAddress("127.0.0.1", port), 128);
        server.createContext("/r/", gateway::handle);
        server.setExecutor(Executors.newFixedThreadPool(16));
        server.start();
        System.out.println("ready");
        System.out.flush();
    }
}
