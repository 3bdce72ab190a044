// One standard session per JDBC driver, for the agent's driver tests (the same
// sessions as drivers.py).
//
// usage: java -cp <driver jar>:<classes> Drivers pgjdbc|mariadb PORT
// Prints "done" when the session went as expected.

import java.sql.Connection;
import java.sql.DriverManager;
import java.sql.PreparedStatement;
import java.sql.ResultSet;
import java.sql.SQLException;
import java.sql.Statement;

public class Drivers {
    static final String SECRET = "secret-literal";

    public static void main(String[] args) throws Exception {
        String driver = args[0];
        int port = Integer.parseInt(args[1]);
        boolean pg = driver.equals("pgjdbc");
        String url = pg
                ? "jdbc:postgresql://127.0.0.1:" + port + "/postgres?user=postgres&prepareThreshold=1"
                : "jdbc:mariadb://127.0.0.1:" + port + "/mysql?user=root&useServerPrepStmts=true";
        try (Connection c = DriverManager.getConnection(url)) {
            String sql = pg ? "SELECT ?::int + 40 AS answer, ? AS s" : "SELECT ? + 40 AS answer, ? AS s";
            try (PreparedStatement ps = c.prepareStatement(sql)) {
                for (int n = 1; n <= 2; n++) {
                    ps.setInt(1, n);
                    ps.setString(2, SECRET);
                    try (ResultSet rs = ps.executeQuery()) {
                        rs.next();
                    }
                }
            }
            String failing = pg ? "SELECT 1 / 0" : "SELECT * FROM no_such_table WHERE id = 7";
            try (Statement st = c.createStatement()) {
                st.executeQuery(failing);
                throw new IllegalStateException(failing + " succeeded");
            } catch (SQLException expected) {
                // 22012 / 1146
            }
        }
        System.out.println("done");
    }
}
